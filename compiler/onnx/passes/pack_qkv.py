"""PackQkvPass: the q, k and v projections of a GroupQueryAttention -> one MatMul with packed QKV input.

    GQA(MatMul(x, Wq) [+ bq], MatMul(x, Wk) [+ bk], MatMul(x, Wv) [+ bv], ...)
      ->  GQA(MatMul(x, concat(Wq, Wk, Wv)) [+ concat(bq, bk, bv)], None, None, ...)

One weight read and one kernel call instead of three per layer; GroupQueryAttention splits the packed
input itself. Runs after the attention fusion and before quantization, so the packed weight is
quantized as one MatMulNBits (module path `...self_attn.qkv_proj`, what --keep-fp32/--keep-int8 match).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.memory import release_pages
from compiler.onnx.passes.base import CountingPass, TransposedRows, weight_rows
from compiler.onnx.scopes import renamed_scopes


def _projection(value: ir.Value | None):
    """(input, weight rows [N, K], bias array or None, nodes) when value = MatMul(x, W) [+ b]; else None."""
    if value is None or value.producer() is None:
        return None
    node = value.producer()
    bias, nodes = None, []
    if node.op_type == "Add" and node.domain == "":
        a, b = node.inputs
        matmul_out, bias_value = (a, b) if b is not None and b.const_value is not None else (b, a)
        if bias_value is None or bias_value.const_value is None or matmul_out is None or matmul_out.producer() is None:
            return None
        bias = bias_value.const_value.numpy()
        nodes.append(node)
        node = matmul_out.producer()
    if node.op_type != "MatMul" or node.domain != "" or node.inputs[1].const_value is None:
        return None
    rows = weight_rows(node.inputs[1])
    if rows is None or (bias is not None and bias.shape != (rows.shape[0],)):
        return None
    nodes.append(node)
    return node.inputs[0], rows, bias, nodes


class PackQkvPass(CountingPass):
    def __init__(self):
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        packed = 0
        for gqa in [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]:
            parts = [_projection(gqa.inputs[i]) for i in range(3)]
            if any(p is None for p in parts) or len({id(p[0]) for p in parts}) != 1:
                continue
            if any(len(p[3][-1].outputs[0].uses()) != 1 for p in parts):
                continue  # a projection read elsewhere must stay
            x = parts[0][0]
            q_matmul = parts[0][3][-1]
            rows = np.concatenate([p[1] for p in parts], axis=0)  # whole rows: one copy, no transposes
            release_pages(*[p[1] for p in parts])
            prefix = q_matmul.name or f"qkv_{packed}"
            weight_value = ir.Value(name=f"{prefix}.qkv_weight", const_value=TransposedRows(rows, f"{prefix}.qkv_weight"))
            graph.register_initializer(weight_value)
            matmul = ir.node("MatMul", [x, weight_value], name=f"{prefix}_qkv", metadata_props=renamed_scopes(q_matmul, "q_proj", "qkv_proj"))
            matmul.outputs[0].dtype, matmul.outputs[0].name = ir.DataType.FLOAT, f"{prefix}_qkv_out"
            new_nodes, packed_out = [matmul], matmul.outputs[0]
            if any(p[2] is not None for p in parts):
                bias = np.concatenate([p[2] if p[2] is not None else np.zeros(p[1].shape[0], np.float32) for p in parts])
                bias_value = ir.Value(name=f"{prefix}.qkv_bias", const_value=ir.tensor(bias, name=f"{prefix}.qkv_bias"))
                graph.register_initializer(bias_value)
                add = ir.node("Add", [packed_out, bias_value], name=f"{prefix}_qkv_bias")
                add.outputs[0].dtype, add.outputs[0].name = ir.DataType.FLOAT, f"{prefix}_qkv_bias_out"
                new_nodes.append(add)
                packed_out = add.outputs[0]
            graph.insert_before(gqa, new_nodes)
            gqa.replace_input_with(0, packed_out)
            gqa.replace_input_with(1, None)
            gqa.replace_input_with(2, None)
            for _, _, _, nodes in parts:
                for node in nodes:
                    olds = [v for v in node.inputs if v is not None and v.const_value is not None]
                    graph.remove(node, safe=True)
                    for old in olds:
                        if not old.uses() and old.name in graph.initializers:
                            del graph.initializers[old.name]
            packed += 1
        self.counts = {"packed_qkv": packed}
        return ir.passes.PassResult(model, modified=bool(packed))
