"""One decoder layer's graph stamped N times: export time that does not grow with the layer count.

Every layer has the same graph and only different weights, so edgec makes the graph of a 1-layer decoder
that shares the real model's embedding, norm and head (written by layer_graph.py, or traced: torch.export
spends most of its time in symbolic-shape machinery per traced op, so a 30-layer decoder takes ~15x as long
to trace as a 1-layer one), then copies the layer's nodes for layers 1..N-1 in onnx_ir, each copy reading
that layer's own weights and KV inputs and writing its own present outputs. Layer-0 nodes are the ones
tagged with the module path `model.layers.0` (the exporter's name-scope metadata). Each weight of the
template is matched to the parameter it came from (the exporter names some and folds the transpose of
others) and checked to hold exactly that parameter's data before anything is stamped; if a check fails, the
caller makes the whole model's graph instead.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from compiler.models.decoder import CanonicalDecoder
from compiler.onnx.passes.base import TransposedRows
from compiler.onnx.scopes import module_path, renamed_scopes, scopes

LAYER0 = "model.layers.0"


class TemplateMismatch(Exception):
    """The template layer is not in the shape this module expects; make the full model's graph instead."""


def _weight_sources(nodes: list[ir.Node], params: dict[str, torch.Tensor]) -> dict[ir.Value, tuple[str, bool]]:
    """Each constant input of the layer-0 nodes -> (layer-0 parameter name, stored transposed)."""
    sources: dict[ir.Value, tuple[str, bool]] = {}
    for node in nodes:
        for value in node.inputs:
            if value is None or value.const_value is None or value in sources:
                continue
            if value.name in params and value.name.startswith(LAYER0 + "."):
                sources[value] = (value.name, False)
                continue
            module = module_path(node)
            if not module.startswith(LAYER0 + "."):
                continue
            for suffix in ("weight", "bias"):
                name = f"{module}.{suffix}"
                param = params.get(name)
                if param is None:
                    continue
                shape = tuple(value.const_value.shape)
                if shape == tuple(param.shape[::-1]) and param.dim() == 2:
                    sources[value] = (name, True)
                elif shape == tuple(param.shape):
                    sources[value] = (name, False)
    return sources


def _check_sources(sources: dict[ir.Value, tuple[str, bool]], params: dict[str, torch.Tensor]) -> None:
    for value, (name, transposed) in sources.items():
        expected = params[name].detach().numpy()
        if transposed and isinstance(value.const_value, TransposedRows):
            # A written layer's weight (layer_graph.py): its rows are the parameter itself, or are compared
            # as they are (no transposed copy made).
            rows = value.const_value.rows
            if not _same_memory(rows, expected) and not np.array_equal(rows, expected):
                raise TemplateMismatch(f"template weight {value.name} does not hold {name}")
            continue
        expected = expected.T if transposed else expected
        if not np.array_equal(value.const_value.numpy(), expected):
            raise TemplateMismatch(f"template weight {value.name} does not hold {name}")


def _check_shared(sources: dict[ir.Value, tuple[str, bool]], params: dict[str, torch.Tensor], num_layers: int) -> None:
    """The exporter keeps one initializer for parameters of equal data, so a layer-0 parameter can have no
    template weight of its own and read an equal one's (an untrained model's norms): stamped, every layer
    would read that one's counterpart. Right only where the two are equal in every layer."""
    covered = {name for name, _ in sources.values()}
    for name, param in params.items():
        if not name.startswith(LAYER0 + ".") or name in covered:
            continue
        for twin in covered:
            if params[twin].shape != param.shape or not torch.equal(params[twin], param):
                continue
            for layer in range(1, num_layers):
                if not torch.equal(params[_in_layer(name, layer)], params[_in_layer(twin, layer)]):
                    raise TemplateMismatch(f"the template reads {twin} for {name}, equal in layer 0, not in layer {layer}")


def _in_layer(name: str, layer: int) -> str:
    return name.replace(LAYER0 + ".", f"model.layers.{layer}.", 1)


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.shape == b.shape
            and a.strides == b.strides and a.dtype == b.dtype)


def _layer_tensor(params: dict[str, torch.Tensor], name: str, layer: int, transposed: bool) -> ir.TensorProtocol:
    layer_name = _in_layer(name, layer)
    return parameter_tensor(params[layer_name], f"{layer_name}.T" if transposed else layer_name, transposed)


def parameter_tensor(tensor: torch.Tensor, name: str, transposed: bool) -> ir.TensorProtocol:
    """An initializer's data taken from a parameter: a view of it, or its transpose."""
    tensor = tensor.detach()
    if not transposed:
        return ir.tensor(tensor.numpy(), name=name)  # a view of the parameter, no copy
    return TransposedRows(tensor.numpy(), name)


def _copy_value(value: ir.Value, name: str) -> ir.Value:
    return ir.Value(name=name, type=value.type, shape=value.shape.copy() if value.shape is not None else None)


def stamp_layers(model: ir.Model, decoder: CanonicalDecoder) -> None:
    """Extend a 1-layer exported decoder to decoder.cfg.num_layers layers, in place."""
    graph = model.graph
    cfg = decoder.cfg
    params = dict(decoder.state_dict())
    layer_nodes = [n for n in graph if LAYER0 in scopes(n)]
    if not layer_nodes:
        raise TemplateMismatch("no nodes tagged with model.layers.0")
    in_layer = set(map(id, layer_nodes))
    produced = {v for n in layer_nodes for v in n.outputs}
    graph_inputs = {v.name: v for v in graph.inputs}
    graph_outputs = {v.name: v for v in graph.outputs}

    externals = {v for n in layer_nodes for v in n.inputs if v is not None and v not in produced}
    hidden_in = [v for v in externals if v.const_value is None and v.name not in graph_inputs and v.shape is not None
                 and len(v.shape) == 3 and v.shape[-1] == cfg.hidden_size]
    exits = [v for v in produced if v.name not in graph_outputs
             and any(id(use.node) not in in_layer for use in v.uses())]
    if len(hidden_in) != 1 or len(exits) != 1:
        raise TemplateMismatch(f"layer boundary unclear ({len(hidden_in)} inputs, {len(exits)} outputs)")
    hidden_in, hidden_out = hidden_in[0], exits[0]
    sources = _weight_sources(layer_nodes, params)
    _check_sources(sources, params)
    _check_shared(sources, params, cfg.num_layers)
    kv_names = {f"past_key_values.0.{kind}": kind for kind in ("key", "value")}
    present_names = {f"present.0.{kind}": kind for kind in ("key", "value")}
    if set(kv_names) - set(graph_inputs) or set(present_names) - set(graph_outputs):
        raise TemplateMismatch("KV inputs/outputs of layer 0 not found")

    consumers = [(use.node, use.idx) for use in hidden_out.uses() if id(use.node) not in in_layer]
    first_consumer = consumers[0][0]
    new_inputs, new_outputs = [], []
    previous_out = hidden_out
    for layer in range(1, cfg.num_layers):
        mapping: dict[ir.Value, ir.Value] = {hidden_in: previous_out}
        for name, kind in kv_names.items():
            template = graph_inputs[name]
            mapping[template] = _copy_value(template, f"past_key_values.{layer}.{kind}")
            new_inputs.append(mapping[template])
        for value, (name, transposed) in sources.items():
            tensor = _layer_tensor(params, name, layer, transposed)
            mapping[value] = ir.Value(name=tensor.name, const_value=tensor, type=value.type, shape=value.shape)
            graph.register_initializer(mapping[value])
        clones = []
        for node in layer_nodes:
            inputs = [None if v is None else mapping.get(v, v) for v in node.inputs]
            metadata = renamed_scopes(node, LAYER0, f"model.layers.{layer}")
            clone = ir.Node(node.domain, node.op_type, inputs, [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                            num_outputs=len(node.outputs), name=f"{node.name}__layer{layer}", version=node.version,
                            metadata_props=metadata)
            for old, new in zip(node.outputs, clone.outputs):
                kind = present_names.get(old.name)
                new.name = f"present.{layer}.{kind}" if kind else f"{old.name}__layer{layer}"
                new.type, new.shape = old.type, old.shape.copy() if old.shape is not None else None
                mapping[old] = new
                if kind:
                    new_outputs.append(new)
            clones.append(clone)
        graph.insert_before(first_consumer, clones)
        previous_out = mapping[hidden_out]
    for node, index in consumers:
        node.replace_input_with(index, previous_out)
    graph.inputs.extend(new_inputs)
    graph.outputs.extend(new_outputs)
