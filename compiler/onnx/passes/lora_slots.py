"""LoraSlotsPass: a runtime LoRA branch on each slotted projection, its A and B as graph inputs.

    y = MatMul(x, W)            ->  y = MatMul(x, W) + MatMul(MatMul(x, A), B)
    qkv = MatMul(x, Wqkv)       ->  qkv + Concat(x A_q B_q, x A_k B_k, x A_v B_v)

A and B are inputs named `<module>.lora_A` [in, r] and `<module>.lora_B` [r, out] with a rank dimension
of their own, which is what an onnxruntime adapter file (.onnx_adapter) and onnxruntime-genai's Adapters
feed by name. Each input also has an empty initializer (r = 0) as its default, so a run with no adapter,
or with one that does not target the module, computes the base exactly. fp16 pairs are cast to fp32 in
the graph (onnxruntime's CPU MatMul has no fp16 kernel on x86). Runs last: the base weights are already
packed and quantized, and the branch never is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.models.lora_slots import PACKED, LoraSlots
from compiler.onnx.passes.base import CountingPass
from compiler.onnx.scopes import module_path

PROJECTION_OPS = ("MatMul", "MatMulNBits")
IR_DTYPES = {"fp16": (ir.DataType.FLOAT16, np.float16), "fp32": (ir.DataType.FLOAT, np.float32)}


def input_names(module: str) -> tuple[str, str]:
    return f"{module}.lora_A", f"{module}.lora_B"


def _parts(node_module: str) -> list[str]:
    """The projections a matmul computes: itself, or the parts of a packed one (qkv_proj)."""
    if node_module.endswith(".self_attn.qkv_proj"):
        prefix = node_module.rsplit(".", 2)[0]
        return [f"{prefix}.{p}" for p in PACKED[0]]
    return [node_module]


class LoraSlotsPass(CountingPass):
    def __init__(self, slots: LoraSlots):
        super().__init__()
        self.slots = slots

    def _pair_inputs(self, graph: ir.Graph, module: str) -> tuple[ir.Value, ir.Value]:
        fan_in, fan_out = self.slots.modules[module]
        dtype, np_dtype = IR_DTYPES[self.slots.dtype]
        rank = f"{module}.lora_r"
        values = []
        for name, shape, empty in zip(input_names(module), ([fan_in, rank], [rank, fan_out]),
                                      ((fan_in, 0), (0, fan_out))):
            value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape),
                             const_value=ir.tensor(np.zeros(empty, np_dtype), name=name))
            graph.inputs.append(value)
            graph.register_initializer(value)
            values.append(value)
        return values[0], values[1]

    def _branch(self, graph: ir.Graph, x: ir.Value, module: str, nodes: list[ir.Node]) -> ir.Value:
        a, b = self._pair_inputs(graph, module)
        if self.slots.dtype != "fp32":
            casts = [ir.node("Cast", [v], attributes={"to": ir.DataType.FLOAT}, name=f"{v.name}_cast") for v in (a, b)]
            nodes += casts
            a, b = casts[0].outputs[0], casts[1].outputs[0]
        down = ir.node("MatMul", [x, a], name=f"{module}.lora_down")
        up = ir.node("MatMul", [down.outputs[0], b], name=f"{module}.lora_up")
        nodes += [down, up]
        for node in (down, up):
            node.outputs[0].dtype, node.outputs[0].name = ir.DataType.FLOAT, node.name
        return up.outputs[0]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        done: set[str] = set()
        for node in [n for n in graph if n.op_type in PROJECTION_OPS and n.inputs[1] is not None
                     and n.inputs[1].const_value is not None]:
            parts = _parts(module_path(node))
            if not any(p in self.slots.modules for p in parts):
                continue
            if not all(p in self.slots.modules for p in parts):
                raise ValueError(f"{module_path(node)}: packed projection with slots on only some parts")
            new_nodes: list[ir.Node] = []
            deltas = [self._branch(graph, node.inputs[0], p, new_nodes) for p in parts]
            delta = deltas[0]
            if len(deltas) > 1:
                concat = ir.node("Concat", deltas, attributes={"axis": -1}, name=f"{parts[0]}.lora_concat")
                concat.outputs[0].dtype = ir.DataType.FLOAT
                new_nodes.append(concat)
                delta = concat.outputs[0]
            y = node.outputs[0]
            add = ir.node("Add", [y, delta], name=f"{module_path(node)}.lora_add")
            add.outputs[0].dtype, add.outputs[0].shape = ir.DataType.FLOAT, y.shape
            new_nodes.append(add)
            y.replace_all_uses_with(add.outputs[0])
            add.replace_input_with(0, y)  # replace_all_uses_with rewired the Add's own input too
            graph.insert_after(node, new_nodes)
            done.update(parts)
        missing = sorted(set(self.slots.modules) - done)
        if missing:
            raise ValueError(f"no projection matmul found for LoRA slot(s) {', '.join(missing[:3])}")
        self.counts = {"lora_slots": len(done)}
        return ir.passes.PassResult(model, modified=bool(done))
