"""QuantizeWeightsPass: constant MatMul weights -> com.microsoft MatMulNBits, the embedding -> GatherBlockQuantized.

    MatMul(x, W[K, N])                 ->  MatMulNBits(x, Wq[N, K/bs, bs*bits/8], scales[N, K/bs], zp?)
    MatMul(x, Transpose(E[V, H]))      ->  MatMulNBits(x, Eq[V, H/bs, ...], ...)     (a tied lm_head)
    Gather(E[V, H], input_ids)         ->  GatherBlockQuantized(Eq[V, H*bits/8], input_ids, scales, zp?)

Blocks run along the input dimension K (compiler/quant/blocks.py: rtn and clip; GPTQ's blocks arrive
precomputed). Modules named in `keep_fp32`/`keep_int8` (regexes over the torch module path
that the exporter records on each node) stay fp32 or use 8 bits; a `--quant auto` plan gives each module its
own bits and block (QuantConfig.bits_for / block_for). Weights are quantized one at a time and
the fp32 initializer is dropped as soon as nothing else reads it.

The block arithmetic lives in compiler/quant/blocks.py (own numpy code rather than onnxruntime's
MatMulNBitsQuantizer: it works on onnx_ir in place, with no ModelProto copy of the whole model, and
carries the clip search and GPTQ's blocks; the packing is checked against onnxruntime's kernels in tests).
"""

from __future__ import annotations


import numpy as np
import onnx_ir as ir

from compiler.config import QuantConfig
from compiler.memory import release_pages
from compiler.onnx.passes.base import CountingPass, weight_rows
from compiler.onnx.scopes import module_path
from compiler.quant.blocks import largest_dividing_block, pack, quantize_blocks
from compiler.quant.gptq import codes_for

def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _swap_node(graph: ir.Graph, node: ir.Node, op_type: str, inputs: list, attributes: dict) -> None:
    """Replace `node` by one com.microsoft node with its name, metadata and output type."""
    new = ir.node(op_type, inputs, attributes=attributes, domain="com.microsoft", name=node.name,
                  outputs=[ir.Value(name=None)], metadata_props=dict(node.metadata_props))
    new.outputs[0].shape, new.outputs[0].dtype = node.outputs[0].shape, node.outputs[0].dtype
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)


class QuantizeWeightsPass(CountingPass):
    def __init__(self, config: QuantConfig, precomputed: dict[str, tuple] | None = None):
        super().__init__()
        self.config = config
        # module path -> (q, scales, zeros) from a calibration algorithm (GPTQ); RTN/clip otherwise
        self.precomputed = precomputed or {}

    def _precomputed(self, module: str, bits: int):
        if bits != self.config.bits or not self.precomputed:
            return None
        return codes_for(self.precomputed, module)

    def _tied_table(self, graph: ir.Graph) -> tuple[ir.Value | None, int]:
        """The [V, H] table read both by the embedding Gather and, transposed, by the lm_head MatMul
        (symmetric only: asymmetric zero points are laid out differently for the two ops). The table's
        block must divide H, else the 3-D gather would return the padding: when the configured block does
        not, the table uses the largest power of two below it that does. Returns (table, its block)."""
        if not self.config.symmetric:
            return None, 0
        gathered = {id(n.inputs[0]): n.inputs[0] for n in graph if n.op_type == "Gather" and n.inputs[0] is not None
                    and n.inputs[0].const_value is not None}
        for node in graph:
            if node.op_type == "Transpose" and node.inputs[0] is not None and id(node.inputs[0]) in gathered:
                if any(use.node.op_type == "MatMul" for use in node.outputs[0].uses()):
                    block = largest_dividing_block(node.inputs[0].const_value.shape[1], self.config.block_for("lm_head"))
                    return (node.inputs[0], block) if block else (None, 0)
        return None, 0

    def _tensors(self, name: str, w_nk: np.ndarray, bits: int, embedding: bool, module: str = "",
                 block: int | None = None):
        cfg = self.config
        block = block or cfg.block_size
        precomputed = self._precomputed(module, bits)
        if precomputed is not None and precomputed[0].shape[2] == block:
            q, scale, zero = precomputed
            self.counts["calibrated"] = self.counts.get("calibrated", 0) + 1
        else:
            algo = cfg.algo if cfg.algo in ("rtn", "clip") else "rtn"
            q, scale, zero = quantize_blocks(w_nk, bits, block, cfg.symmetric, algo)
        n, nb, _ = q.shape
        if embedding:  # GatherBlockQuantized takes [V, H] packed rows without the last block's padding
            data = pack(q.reshape(n, -1)[:, : w_nk.shape[1]], bits)
        else:
            data = pack(q, bits)
        tensors = [ir.Value(name=f"{name}_q{bits}", const_value=ir.tensor(data, name=f"{name}_q{bits}")),
                   ir.Value(name=f"{name}_scales", const_value=ir.tensor(scale, name=f"{name}_scales"))]
        if not cfg.symmetric:
            zp = pack(zero, bits)
            tensors.append(ir.Value(name=f"{name}_zp", const_value=ir.tensor(zp, name=f"{name}_zp")))
        return tensors

    def _register(self, graph: ir.Graph, values: list[ir.Value]) -> None:
        for value in values:
            graph.register_initializer(value)

    def _drop_if_unused(self, graph: ir.Graph, value: ir.Value) -> None:
        if value is not None and not value.uses() and value.name in graph.initializers and not value.is_graph_output():
            del graph.initializers[value.name]

    def _replace_matmul(self, graph, node, w_nk, bits, module, reuse: list[ir.Value] | None = None,
                        block: int | None = None):
        cfg = self.config
        n, k = w_nk.shape
        values = reuse
        if values is None:
            values = self._tensors(f"{module or node.name}.weight", w_nk, bits, embedding=False, module=module,
                                   block=block)
            self._register(graph, values)
        inputs = [node.inputs[0], *values]
        attributes = {"K": k, "N": n, "bits": bits, "block_size": block or cfg.block_size,
                      "accuracy_level": cfg.accuracy_level}
        _swap_node(graph, node, "MatMulNBits", inputs, attributes)

    def _replace_gather(self, graph, node, table, bits, shared: list[ir.Value] | None, table_block: int = 0):
        cfg = self.config
        if shared is None:
            block = cfg.block_for("model.embed_tokens")
            values = self._tensors("model.embed_tokens.weight", table, bits, embedding=True, block=block)
            self._register(graph, values)
            inputs = [values[0], node.inputs[1], values[1]] + (values[2:] if not cfg.symmetric else [])
            attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits}
            _swap_node(graph, node, "GatherBlockQuantized", inputs, attributes)
            return
        # Tied embeddings: gather from the lm_head's own [V, blocks, bytes] table, one block per row
        # of the last axis; the scales get the matching trailing 1 (folded once when the session loads).
        packed, scales = shared[0], shared[1]
        n, nb = scales.const_value.shape
        shape3d = ir.Value(name=f"{scales.name}_3d_shape", const_value=ir.tensor(np.array([n, nb, 1], np.int64)))
        flat = ir.Value(name="embedding_flat_shape", const_value=ir.tensor(np.array([0, 0, -1], np.int64)))
        self._register(graph, [shape3d, flat])
        scales3d = ir.node("Reshape", [scales, shape3d], name=f"{node.name}_scales_3d")
        gather = ir.node("GatherBlockQuantized", [packed, node.inputs[1], scales3d.outputs[0]], domain="com.microsoft",
                         attributes={"gather_axis": 0, "quantize_axis": 2, "block_size": table_block, "bits": bits},
                         name=node.name, metadata_props=dict(node.metadata_props))
        merged = ir.node("Reshape", [gather.outputs[0], flat], name=f"{node.name}_flat")
        for i, new_node in enumerate((scales3d, gather, merged)):
            new_node.outputs[0].name = f"{node.name}_q_out{i}"
            new_node.outputs[0].dtype = ir.DataType.FLOAT
        merged.outputs[0].shape = node.outputs[0].shape
        ir.convenience.replace_nodes_and_values(graph, node, [node], [scales3d, gather, merged], node.outputs, merged.outputs)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        graph = model.graph
        self.counts = {}
        bytes_before = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)

        def count(key):
            self.counts[key] = self.counts.get(key, 0) + 1

        shared_table, table_block = self._tied_table(graph)
        shared_values: list[ir.Value] | None = None

        for node in list(graph):
            if node.op_type == "MatMul" and node.domain == "":
                weight = node.inputs[1]
                w_nk = weight_rows(weight)  # a view; quantization copies row chunks
                transposed_source = None
                if w_nk is None:
                    producer = weight.producer() if weight is not None else None
                    if producer is None or producer.op_type != "Transpose" or _const(producer.inputs[0]) is None:
                        continue
                    if list(producer.attributes.get_ints("perm", [1, 0])) != [1, 0]:
                        continue
                    transposed_source = producer
                    w_nk = _const(producer.inputs[0])
                    if w_nk.ndim != 2:
                        continue
                module = module_path(node)
                is_head = module == "lm_head"
                default = cfg.lm_head_bits if is_head else cfg.bits
                bits = self.config.bits_for(module, default)
                reuse = shared_values if transposed_source is not None and shared_table is not None \
                    and transposed_source.inputs[0] is shared_table else None
                block = cfg.block_for(module)
                if bits == 0 or (reuse is None and w_nk.shape[1] < block):
                    count("matmul_kept_fp32")
                    continue
                self._replace_matmul(graph, node, w_nk.astype(np.float32, copy=False), bits, module, reuse,
                                     table_block if reuse is not None else block)
                release_pages(w_nk)  # the fp32 source's mapped pages, no longer needed (see release_pages)
                if reuse is not None:
                    count("lm_head_shares_embedding_table")
                count(f"{'lm_head' if is_head else 'matmul'}_int{bits}")
                self._drop_if_unused(graph, weight)
                if transposed_source is not None and not transposed_source.outputs[0].uses():
                    source = transposed_source.inputs[0]
                    graph.remove(transposed_source, safe=True)
                    self._drop_if_unused(graph, source)
            elif node.op_type == "Gather" and node.domain == "" and node.attributes.get_int("axis", 0) == 0:
                table = _const(node.inputs[0])
                if table is None or table.ndim != 2 or node.inputs[1] not in graph.inputs:
                    continue
                bits = self.config.bits_for("model.embed_tokens", cfg.embedding_bits)
                if bits == 0:
                    count("embedding_kept_fp32")
                    continue
                source = node.inputs[0]
                if source is shared_table and bits == self.config.bits_for("lm_head", cfg.lm_head_bits):
                    shared_values = self._tensors("lm_head.weight", table.astype(np.float32, copy=False), bits,
                                                  embedding=False, module="lm_head", block=table_block)
                    if table_block != cfg.block_for("lm_head"):
                        self.counts[f"shared_table_block_{table_block}"] = 1
                    self._register(graph, shared_values)
                    self._replace_gather(graph, node, table, bits, shared_values, table_block)
                else:
                    self._replace_gather(graph, node, table.astype(np.float32, copy=False), bits, None)
                release_pages(table)
                count(f"embedding_int{bits}")
                self._drop_if_unused(graph, source)
        bytes_after = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
        self.counts["weight_mb_before"] = round(bytes_before / 1e6, 1)
        self.counts["weight_mb_after"] = round(bytes_after / 1e6, 1)
        return ir.passes.PassResult(model, modified=bytes_after != bytes_before)
