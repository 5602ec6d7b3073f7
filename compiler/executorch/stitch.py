"""Lower three layers, not all of them: the middle layer's lowered segment is repeated for the others.

Every whole-program step of ExecuTorch's lowering (three decompositions, the edge passes, partitioning)
re-traces each node on fake tensors with symbolic shapes, several seconds per layer. The decoder's layers
are the same program with different weights, so edgec lowers a template decoder of layers
(0, 1, last) and then writes the edge program of the whole model from it: the segment of the middle
layer (KV-cache updates, SDPA, and the XNNPACK partition holding that layer's o_proj and MLP and the
next layer's norm, q/k/v and rope) is copied once per layer 1 .. n-2. Each copy gets its own cache
buffers, its own norm weights, and a delegate serialized by XNNPACK from the template partition with
that layer's weights bound in (`preprocess_cache` makes this a serialization, not a re-lowering).

Anything that does not have the expected shape raises StitchError and the caller lowers the whole
model instead. A stitched program computes what the whole-model lowering computes, bit for bit (tested at
4 layers, checked at 8 and 30).
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Callable

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec

from compiler.executorch.preprocess_cache import partition_signature, tensor_table

LAYER_TARGET = re.compile(r"^layers\.(\d+)\.(.+)$")
CACHE_TARGET = re.compile(r"^([kv]_cache)_(\d+)$")


class StitchError(Exception):
    """The lowered template is not laid out as stitching expects."""


def template_layers(num_layers: int) -> tuple[int, int, int] | None:
    """The decoder layers lowered for real: the first (no o_proj before it), one middle layer (the one
    repeated) and the last (no next layer's q/k/v after it). None when that is the whole model."""
    return (0, 1, num_layers - 1) if num_layers >= 4 else None


def check_uniform_layers(decoder: torch.nn.Module) -> None:
    """Copies of layer 1 stand for layers 1 .. n-2, and the copied partition holds the next layer's norm and
    q/k/v: those layers must be laid out as layer 1 is (kind, shapes, dtypes, quantization scheme)."""
    layers = list(decoder.layers)
    if len({layer.rope for layer in layers[1:]}) > 1:
        # The copied partition rotates the next layer's q/k as the last layer's: one rope for layers 1 .. n-1.
        raise StitchError("layers use different rope (no rope or local/global tables)")
    in_next_partition = ("input_layernorm.", "self_attn.qkv_proj.", "self_attn.qk_norm.")
    if any(_layout(layer) != _layout(layers[1]) for layer in layers[2:-1]) or \
            _layout(layers[-1], in_next_partition) != _layout(layers[1], in_next_partition):
        raise StitchError("layers are quantized differently: --keep-fp32/--keep-int8")


def _layout(layer: torch.nn.Module, prefixes: tuple[str, ...] = ("",)) -> list:
    layout = []
    for name, tensor in layer.named_parameters():
        if not name.startswith(prefixes):
            continue
        entry = [name, type(tensor).__name__, tuple(tensor.shape), tensor.dtype]
        if hasattr(tensor, "__tensor_flatten__"):  # a torchao quantized weight: its scheme and pieces
            pieces, context = tensor.__tensor_flatten__()
            entry += [repr(context), [(p, tuple(getattr(tensor, p).shape), getattr(tensor, p).dtype) for p in pieces]]
        layout.append(entry)
    return layout


def _is_delegate(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "executorch_call_delegate"


def _layer_of(target: str | None) -> int | None:
    """Template layer a placeholder belongs to (norm weights, KV cache), None for shared ones."""
    if target is None:
        return None
    match = LAYER_TARGET.match(target) or CACHE_TARGET.match(target)
    return int(match.group(2) if match.re is CACHE_TARGET else match.group(1)) if match else None


def _retarget(target: str, layer: int) -> str:
    match = LAYER_TARGET.match(target)
    if match:
        return f"layers.{layer}.{match.group(2)}"
    match = CACHE_TARGET.match(target)
    return f"{match.group(1)}_{layer}"


def layer_tensor(decoder: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor behind an edge-program target of the full decoder, including the flattened pieces
    (`parametrizations.weight.original<i>`) of a torchao quantized weight."""
    match = re.match(r"^(.*)\.parametrizations\.(\w+)\.original(\d+)$", target)
    if match:
        weight = getattr(decoder.get_submodule(match.group(1)), match.group(2))
        names, _ = weight.__tensor_flatten__()
        return getattr(weight, names[int(match.group(3))])
    module, _, name = target.rpartition(".")
    return getattr(decoder.get_submodule(module) if module else decoder, name)


def _segment(graph: torch.fx.Graph, specs: dict[str, InputSpec]) -> tuple[list[torch.fx.Node], torch.fx.Node, torch.fx.Node]:
    """Template layer 1's nodes: the copies that split its q/k/v off the delegate feeding it (previous),
    its cache updates, SDPA and the delegate taking the SDPA output (this)."""
    caches = {n for n in graph.nodes if n.op == "placeholder" and specs[n.name].target in ("k_cache_1", "v_cache_1")}
    updates = [n for n in graph.nodes if n.op == "call_function" and any(a in caches for a in _flat_nodes(n))]
    if len(caches) != 2 or len(updates) != 2:
        raise StitchError("layer 1's cache updates not found")
    segment = set(updates)
    for update in updates:
        segment.update(update.users)
    sdpa = [n for n in graph.nodes if any(u in segment for u in _flat_nodes(n)) and n not in segment
            and "sdpa" in str(n.target)]
    if len(sdpa) != 1:
        raise StitchError("layer 1's SDPA not found")
    delegates = [u for u in sdpa[0].users if _is_delegate(u)]
    if len(delegates) != 1 or len(sdpa[0].users) != 1:
        raise StitchError("layer 1's SDPA does not feed one delegate")
    this = delegates[0]
    # Back from the cache updates and SDPA to the delegate output they read, through the nodes between
    # (the q/k/v slices); the position scalar and other inputs not computed from a delegate are shared.
    feeding, pending = set(), [a for n in (*updates, sdpa[0]) for a in _flat_nodes(n) if a not in segment]
    reads_delegate: dict = {}
    while pending:
        node = pending.pop()
        if node in segment or node.op != "call_function" or not _reads_delegate(node, reads_delegate):
            continue
        if node.target is operator.getitem and _is_delegate(node.args[0]):
            feeding.add(node.args[0])
            continue
        segment.add(node)
        pending.extend(_flat_nodes(node))
    if len(feeding) != 1:
        raise StitchError("layer 1 is not fed by one delegate")
    segment.update((sdpa[0], this, this.args[0]))
    segment.update(this.users)
    if any(u.target is not operator.getitem for u in this.users):
        raise StitchError("the layer delegate's outputs are not unpacked by getitem")
    return [n for n in graph.nodes if n in segment], feeding.pop(), this


def _reads_delegate(node: torch.fx.Node, seen: dict) -> bool:
    """Whether a node's value is computed from some delegate's output (`seen` memoizes the walk)."""
    if node not in seen:
        seen[node] = False
        seen[node] = _is_delegate(node) or any(_reads_delegate(a, seen) for a in _flat_nodes(node))
    return seen[node]


def _flat_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def stitch_layers(edge: ExportedProgram, decoder: torch.nn.Module, num_layers: int, lower_partition,
                  progress: Callable[[int, int], None] = lambda done, total: None) -> ExportedProgram:
    """The edge program of `decoder` (num_layers) from `edge`, the lowered template whose layers 0, 1, 2
    are the decoder's `template_layers(num_layers)`. `lower_partition(program, template)` serializes one
    partition program with its weights (XNNPACK preprocess) into a lowered module like `template`.
    progress(done, total): copies of layer 1's partition lowered."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    last = num_layers - 1
    graph = edge.graph
    signature = edge.graph_signature
    specs = {s.arg.name: s for s in signature.input_specs}
    segment, feeding, this = _segment(graph, specs)
    gm = edge.graph_module
    template_delegate = getattr(gm, this.args[0].target)
    if partition_signature(getattr(gm, feeding.args[0].target).original_module) != \
            partition_signature(template_delegate.original_module):
        raise StitchError("layer 1's delegate differs from layer 0's")
    this_outputs = {n.args[1]: n for n in this.users}
    in_segment = set(segment)

    # Template layer 2 is the model's last layer: its targets are renamed, tensors unchanged.
    def final_target(target: str | None) -> str | None:
        layer = _layer_of(target)
        return _retarget(target, last) if layer == 2 else target

    new_graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    input_specs: list[InputSpec] = []
    state_dict, constants = {}, {}
    per_copy_inputs: dict[int, dict[torch.fx.Node, torch.fx.Node]] = {}
    segment_placeholders = [n for n in graph.nodes if n.op == "placeholder" and n.name in specs
                            and _layer_of(specs[n.name].target) in (1, 2)
                            and any(u in in_segment for u in n.users)]
    for node in segment_placeholders:
        if any(u not in in_segment for u in node.users) and _layer_of(specs[node.name].target) == 1:
            raise StitchError(f"{specs[node.name].target} is used outside layer 1's segment")

    def add_placeholder(template: torch.fx.Node, name: str, spec: InputSpec, target: str | None, tensor) -> torch.fx.Node:
        new = new_graph.placeholder(name)
        new.meta = dict(template.meta)
        input_specs.append(InputSpec(spec.kind, type(spec.arg)(name=new.name), target, spec.persistent))
        if tensor is not None:
            (state_dict if target_in_state[spec.target] else constants)[target] = tensor
        return new

    target_in_state = {s.target: s.target in edge.state_dict for s in signature.input_specs if s.target}
    copies_added = False
    for node in graph.nodes:
        if node.op != "placeholder":
            break
        spec = specs[node.name]
        if spec.kind == InputKind.USER_INPUT and not copies_added:
            copies_added = True
            for j in range(1, last):
                per_copy_inputs[j] = {}
                for original in segment_placeholders:
                    s = specs[original.name]
                    layer = j if _layer_of(s.target) == 1 else j + 1
                    target = _retarget(s.target, layer)
                    template_tensor = tensor_table(edge, s.target)[s.target]
                    tensor = _as_kind_of(template_tensor, layer_tensor(decoder, target))
                    if layer == 1:
                        _check_same(template_tensor, tensor, target)
                    per_copy_inputs[j][original] = add_placeholder(original, _placeholder_name(original, target), s, target, tensor)
        if node in segment_placeholders and all(u in in_segment for u in node.users):
            continue  # replaced by the copies' own
        target = final_target(spec.target)
        tensor = tensor_table(edge, spec.target)[spec.target] if spec.target is not None and spec.kind != InputKind.USER_INPUT else None
        name = _placeholder_name(node, target) if target != spec.target else node.name
        env[node] = add_placeholder(node, name, spec, target, tensor)

    copy_envs: dict[int, dict[torch.fx.Node, torch.fx.Node]] = {}

    def emit_copies() -> None:
        for j in range(1, last):
            local: dict[torch.fx.Node, torch.fx.Node] = {}

            def lookup(x: torch.fx.Node, j=j, local=local) -> torch.fx.Node:
                if x in local:
                    return local[x]
                if x in per_copy_inputs[j]:
                    return per_copy_inputs[j][x]
                if j > 1 and x.op == "call_function" and x.target is operator.getitem and x.args[0] is feeding:
                    if x.args[1] not in this_outputs:
                        raise StitchError(f"output {x.args[1]} of layer 1's delegate is never read")
                    return copy_envs[j - 1][this_outputs[x.args[1]]]
                return env[x]

            for node in segment:
                if node.op == "get_attr":
                    lowered = lower_partition(_rebound(template_delegate, decoder, j), template_delegate)
                    if not isinstance(lowered, LoweredBackendModule):
                        raise StitchError("partition lowering returned no lowered module")
                    name = f"lowered_module_layer_{j}"  # the prefix ExecuTorch's delegation summary counts
                    gm_new_attrs[name] = lowered
                    local[node] = new_graph.get_attr(name)
                else:
                    local[node] = new_graph.node_copy(node, lookup)
            copy_envs[j] = local
            progress(j, last - 1)

    gm_new_attrs: dict[str, torch.nn.Module] = {}
    emitted = False
    for node in graph.nodes:
        if node.op == "placeholder" or node in in_segment:
            continue
        if not emitted and any(a in in_segment for a in _flat_nodes(node)):
            emit_copies()
            emitted = True
        if node.op == "output":
            break
        if node.op == "get_attr":
            gm_new_attrs[node.target] = getattr(gm, node.target)
        env[node] = new_graph.node_copy(node, lambda x: copy_envs[last - 1][x] if x in in_segment else env[x])
    if not emitted:
        raise StitchError("nothing after layer 1 uses its outputs")

    output_node = next(n for n in graph.nodes if n.op == "output")
    outputs, output_specs = [], []
    for value, spec in zip(output_node.args[0], signature.output_specs):
        if spec.kind == OutputKind.BUFFER_MUTATION and spec.target in ("k_cache_1", "v_cache_1"):
            if spec.target == "k_cache_1":  # emit both caches of each copy in the template's order
                for j in range(1, last):
                    for cache_spec, cache_value in _cache_outputs(output_node, signature, copy_envs[j]):
                        outputs.append(cache_value)
                        output_specs.append(OutputSpec(cache_spec.kind, type(cache_spec.arg)(name=cache_value.name),
                                                       _retarget(cache_spec.target, j)))
            continue
        new_value = env[value] if value not in in_segment else copy_envs[last - 1][value]
        outputs.append(new_value)
        output_specs.append(OutputSpec(spec.kind, type(spec.arg)(name=new_value.name) if hasattr(spec.arg, "name") else spec.arg,
                                       final_target(spec.target)))
    new_graph.output(tuple(outputs))

    root = torch.nn.Module()
    for name, module in gm_new_attrs.items():
        setattr(root, name, module)
    new_gm = torch.fx.GraphModule(root, new_graph)
    return ExportedProgram(
        root=new_gm, graph=new_gm.graph,
        graph_signature=ExportGraphSignature(input_specs=input_specs, output_specs=output_specs),
        state_dict=state_dict, range_constraints=edge.range_constraints,
        module_call_graph=copy.deepcopy(edge.module_call_graph[:1]), constants=constants,
        verifiers=[edge.verifier],
    )


def _placeholder_name(template: torch.fx.Node, target: str) -> str:
    """Placeholders name the function's arguments, so each layer's must be unique: p_/b_ plus its target."""
    return template.name.split("_", 1)[0] + "_" + target.replace(".", "_")


def _cache_outputs(output_node: torch.fx.Node, signature: ExportGraphSignature, local: dict):
    for value, spec in zip(output_node.args[0], signature.output_specs):
        if spec.kind == OutputKind.BUFFER_MUTATION and spec.target in ("k_cache_1", "v_cache_1"):
            yield spec, local[value]


def _rebound(lowered, decoder: torch.nn.Module, j: int) -> ExportedProgram:
    """The template partition program with layer j's (and j + 1's) weights in place of layers 1 and 2."""
    program = lowered.original_module
    rebound = copy.copy(program)
    rebound._state_dict = dict(program.state_dict)
    rebound._constants = dict(program.constants)
    for spec in program.graph_signature.input_specs:
        layer = _layer_of(spec.target)
        if layer is None:
            continue
        if layer not in (1, 2):
            raise StitchError(f"layer 1's delegate reads {spec.target}")
        table = tensor_table(rebound, spec.target)
        tensor = layer_tensor(decoder, _retarget(spec.target, j if layer == 1 else j + 1))
        if j == 1 and layer == 1:
            _check_same(table[spec.target], tensor, spec.target)
        table[spec.target] = _as_kind_of(table[spec.target], tensor)
    return rebound


def _check_same(template: torch.Tensor, tensor: torch.Tensor, target: str) -> None:
    """Layer 1 is in the template: the decoder's tensor found for it must be the template's own (this
    checks `layer_tensor`'s reading of the quantized weights' flattened pieces)."""
    if template.shape != tensor.shape or not torch.equal(template, tensor):
        raise StitchError(f"{target}: the decoder's tensor differs from the template's")


def _as_kind_of(original: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Parameters stay Parameters (the program verifier checks), whatever the decoder holds them as."""
    if isinstance(original, torch.nn.Parameter) and not isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(tensor, requires_grad=False)
    return tensor
