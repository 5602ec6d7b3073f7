"""Run XNNPACK's delegate passes once per distinct partition, not once per layer.

XNNPACK's `preprocess` re-traces every partition through 17 passes on fake tensors with symbolic shapes,
which was most of a 30-layer model's lowering time. The decoder's layers give partitions that differ only
in their weights, so the passes' output for one of them serves all: the cached program's graph is kept
and only its parameter table is pointed at the next partition's tensors before XNNPACK serializes it
(the serializer reads weights through that table, so each partition still gets its own bytes).

A partition is reused only when its graph has the same nodes, arguments, shapes and dtypes as the cached
one and when the passes left the parameter list alone (a pass that folds constants into new tensors would
bake one layer's values into the graph: such partitions are never cached).

The same manager, in every lowering (stitched or not), leaves out the passes that have nothing to match in a
partition (convolutions, batch norms, PReLU, bilinear upsampling, a softmax for the SDPA pattern): each would
re-trace the partition for no change, and the first use of the upsampling and SDPA passes exports their
pattern graphs (2.4 s).

The serializer's packing of int4 weights into nibbles (`NodeVisitor.convert_to_qc4w`, 1.6 s of a 1B model's
lowering: five passes over each weight, each into new memory) is swapped too, for one that makes the same
bytes in fewer passes.

ExecuTorch has no hook for this: the pass manager is swapped on the preprocess module for the duration of
one lowering. If that name ever moves, lowering runs uncached (slower, same result).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch.export import ExportedProgram


def _describe(value, index: dict) -> object:
    if isinstance(value, torch.fx.Node):
        return ("node", index[value])
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v, index) for v in value)
    if isinstance(value, dict):
        return tuple((k, _describe(v, index)) for k, v in value.items())
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape))
    return repr(value)


def partition_signature(program: ExportedProgram) -> tuple:
    """What the passes can see of a partition, apart from parameter values."""
    kinds = {spec.arg.name: spec.kind.name for spec in program.graph_signature.input_specs
             if hasattr(spec.arg, "name")}
    index: dict = {}
    described = []
    for node in program.graph.nodes:
        index[node] = len(index)
        value = node.meta.get("val")
        shape = (str(value.dtype), tuple(str(d) for d in value.shape)) if isinstance(value, torch.Tensor) else repr(value)
        described.append((node.op, str(node.target) if node.op != "placeholder" else kinds.get(node.name),
                          _describe(node.args, index), _describe(node.kwargs, index), shape))
    return tuple(described)


def tensor_table(program: ExportedProgram, target: str) -> dict:
    """The table holding a program input's tensor: parameters and persistent buffers live in the state
    dict, non-persistent buffers and lifted constants in `constants`."""
    return program.state_dict if target in program.state_dict else program.constants


def _tensor_targets(program: ExportedProgram) -> list[str]:
    return [spec.target for spec in program.graph_signature.input_specs if spec.target is not None]


def _debug_handles(program: ExportedProgram) -> list:
    return [node.meta.get("debug_handle") for node in program.graph.nodes]


class _Cached:
    def __init__(self, source: ExportedProgram, transformed: ExportedProgram):
        # Private tables: the transformed program may share its dicts with the program being lowered.
        transformed._state_dict = dict(transformed.state_dict)
        transformed._constants = dict(transformed.constants)
        self.program = transformed
        self.targets = _tensor_targets(source)
        self.source_handles = _debug_handles(source)
        self.transformed_handles = _debug_handles(transformed)

    def rebind(self, program: ExportedProgram) -> ExportedProgram:
        """The cached graph with `program`'s tensors and debug handles (profiles name the right layer)."""
        for mine, theirs in zip(self.targets, _tensor_targets(program)):
            tensor_table(self.program, mine)[mine] = tensor_table(program, theirs)[theirs]
        handles = {mine: theirs for mine, theirs in zip(self.source_handles, _debug_handles(program))
                   if mine is not None}
        for node, handle in zip(self.program.graph.nodes, self.transformed_handles):
            if handle is not None:
                node.meta["debug_handle"] = handles.get(handle, handle)
        return self.program


# XNNPACK pass -> operator name fragments, one of which a partition must hold for the pass to find work.
# None of the passes before them in XNNPACK's list makes these operators.
_PASS_NEEDS = {
    "ConvertToUpsampleBilinear2d": ("upsample_bilinear2d",),
    "ConvertToSDPAPass": ("softmax",),
    "FuseBatchNormPass": ("batch_norm",),
    "DecomposeBatchNorm": ("batch_norm",),
    "Conv1dUnsqueezePass": ("convolution",),
    "PReLUReshapePass": ("prelu",),
}


def passes_with_work(passes: list, program: ExportedProgram) -> list:
    """`passes` less those that would find nothing to change in `program`."""
    operators = " ".join({getattr(node.target, "__name__", str(node.target)) for node in program.graph.nodes
                          if node.op == "call_function"})
    return [p for p in passes
            if not (needs := _PASS_NEEDS.get(getattr(p, "__name__", ""))) or any(n in operators for n in needs)]


def packed_int4(values: torch.Tensor) -> torch.Tensor:
    """XNNPACK's qc4w packing of int4 values [-8, 7] (2-D, or squeezable to it): value + 8 in each nibble,
    even columns in the low nibble, an odd last column padded with 0; as `convert_to_qc4w` makes it."""
    low, high = torch.aminmax(values)
    if low.item() < -8 or high.item() > 7:
        raise ValueError(f"int4 packing: values in [{low.item()}, {high.item()}], outside [-8, 7]")
    if values.ndim != 2:
        values = values.squeeze()
    if values.shape[-1] % 2:
        values = torch.nn.functional.pad(values, (0, 1))
    rows, columns = values.shape
    # Each pair of int8 values as one int16: the even column in its low byte (little-endian)
    pairs = values.to(torch.int8).contiguous().view(torch.int16)
    packed = pairs & 0x0F
    odd = pairs >> 4
    odd &= 0xF0
    packed |= odd
    packed ^= 0x88  # + 8 in each nibble, modulo 16
    return packed.to(torch.uint8).view(rows, columns // 2)


@contextlib.contextmanager
def lean_xnnpack_preprocessing(stats: dict | None = None, reuse: bool = True):
    """While active, XNNPACK's delegate passes leave out those with nothing to match, and (with `reuse`)
    partitions equal to one already processed skip the passes."""
    try:
        from executorch.backends.xnnpack import xnnpack_preprocess
        from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor
        original, original_packing = xnnpack_preprocess.XNNPACKPassManager, NodeVisitor.__dict__["convert_to_qc4w"]
    except (ImportError, AttributeError, KeyError):
        yield
        return
    cache: dict[tuple, _Cached | None] = {}
    counts = stats if stats is not None else {}
    counts.update(partitions=0, reused=0)

    class LeanPassManager(original):
        def transform(self) -> ExportedProgram:
            program = self.exported_program
            counts["partitions"] += 1
            key = (partition_signature(program), tuple(map(str, self.passes))) if reuse else None
            cached = cache.get(key)
            if cached is not None:
                counts["reused"] += 1
                return cached.rebind(program)
            self.passes = passes_with_work(self.passes, program)
            transformed = super().transform()
            if reuse and key not in cache:
                reusable = (_tensor_targets(transformed) == _tensor_targets(program)
                            and not any(n.op == "get_attr" for n in transformed.graph.nodes))
                cache[key] = _Cached(program, transformed) if reusable else None
            return transformed

    xnnpack_preprocess.XNNPACKPassManager = LeanPassManager
    if sys.byteorder == "little":
        NodeVisitor.convert_to_qc4w = staticmethod(packed_int4)
    try:
        yield
    finally:
        xnnpack_preprocess.XNNPACKPassManager = original
        NodeVisitor.convert_to_qc4w = original_packing
