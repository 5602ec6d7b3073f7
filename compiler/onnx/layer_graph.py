"""The decoder's ONNX graph written node by node, as the dynamo exporter writes it, without tracing.

Tracing one layer for layer_template.py to stamp costs about 5 s of a 135M build (torch.export, its
decompositions, the ONNX translation and optimizer), a third of a first build; the models whose layers
rotate differently (SmolLM3, Gemma 3) were traced whole, in time that grew with depth. The traced graph of
CanonicalDecoder is always the same sequence of ONNX nodes for a configuration, differing only in sizes and
constants, so this module writes that sequence directly: the same ops, attributes, constants (one per value,
as the exporter's optimizer leaves them), value types and shapes, graph inputs and outputs, the module
paths in `pkg.torch.onnx.name_scopes` that the stamping and the passes read, and the parameters'
initializers (Linear weights as lazy transposes, as the exporter folds them). Node and value names are its
own. It covers every family edgec loads; `unsupported` names what it does not (then the graph is traced).
tests/test_layer_graph.py checks that it equals the trace, node for node, on each family and option.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from compiler.models.decoder import CanonicalDecoder, DecoderConfig
from compiler.onnx.layer_template import parameter_tensor
from compiler.onnx.scopes import NAME_SCOPES

# The dimension names of the graph's inputs and outputs (onnxruntime-genai's models use the same).
BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
# The exporter's name for past + seq inside the graph (graph outputs name it TOTAL).
PAST_PLUS_SEQ = "past_sequence_length + sequence_length"
OPSET = 20  # the exporter's default opset and IR version (torch 2.13), which the graph must carry alike
IR_VERSION = 10
INT64_MAX = np.iinfo(np.int64).max
FLOAT_MIN = float(np.finfo(np.float32).min)


def unsupported(cfg: DecoderConfig) -> str | None:
    """Why the graph of this configuration is traced rather than written here; None when it is written."""
    if cfg.rotary_dim % 2 or not 0 < cfg.rotary_dim <= cfg.head_dim:
        return f"rotary_dim {cfg.rotary_dim}"
    if cfg.hidden_act not in ("silu", "gelu_pytorch_tanh"):
        return f"activation {cfg.hidden_act}"
    tables = [cfg.rope_inv_freq] + ([cfg.local_rope_inv_freq] if "local" in cfg.layer_rope else [])
    if any(len(table) * 2 != cfg.rotary_dim for table in tables):  # (the module's buffers are made from these)
        return "no rope table of rotary_dim / 2 frequencies"
    return None


class _Writer:
    """Appends nodes to one graph; a node equal to an earlier one (op, inputs, attributes) is not added again
    and a constant equal to an earlier one is shared, as the exporter's optimizer leaves its graph."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.constants: dict[tuple, ir.Value] = {}
        self.nodes: dict[tuple, ir.Node] = {}
        self.count = 0

    def constant(self, value, dtype) -> ir.Value:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            self.count += 1
            name = f"const_{self.count}"
            tensor = ir.tensor(array, name=name)
            self.constants[key] = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype),
                                           shape=ir.Shape(array.shape))
            self.graph.register_initializer(self.constants[key])
        return self.constants[key]

    def ints(self, *values: int) -> ir.Value:
        return self.constant(list(values), np.int64)

    def int_scalar(self, value: int) -> ir.Value:
        return self.constant(value, np.int64)

    def float_scalar(self, value: float) -> ir.Value:
        return self.constant(value, np.float32)

    def parameter(self, name: str, tensor: torch.Tensor, transposed: bool) -> ir.Value:
        data = parameter_tensor(tensor, f"{name}.T" if transposed else name, transposed)
        value = ir.Value(name=data.name, const_value=data, type=ir.TensorType(ir.DataType.FLOAT),
                         shape=ir.Shape(data.shape))
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: list[ir.Value], shape: list, dtype: ir.DataType, scopes: list[str],
           **attributes) -> ir.Value:
        key = (op_type, tuple(id(v) for v in inputs), tuple(sorted((k, repr(v)) for k, v in attributes.items())))
        if key in self.nodes:
            return self.nodes[key].outputs[0]
        self.count += 1
        name = f"{scopes[-1]}_{self.count}"
        node = ir.node(op_type, inputs, attributes=attributes, name=f"node_{name}",
                       metadata_props={NAME_SCOPES: repr(scopes)}, version=None)
        node.outputs[0].name = name
        node.outputs[0].type = ir.TensorType(dtype)
        node.outputs[0].shape = ir.Shape(shape)
        self.nodes[key] = node
        self.graph.append(node)
        return node.outputs[0]


# Short names, as the shapes below are written: element types, and the batch, sequence, past and past + seq
# dimensions.
F, I64, BOOL = ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.BOOL
B, S, P, T = (ir.SymbolicDim(n) for n in (BATCH, SEQUENCE, PAST, PAST_PLUS_SEQ))
SIZE_SCOPE = "_empty_nn_module_stack_from_metadata_hook"  # the exporter's scope for its size nodes


def write_decoder(model: CanonicalDecoder, last_position_logits: bool) -> ir.Model | None:
    """The decoder's graph, equal to what export._trace makes of it (node for node, names aside); None when
    `unsupported`. The export writes a one-layer view and stamps it, or, where layers rotate differently
    (SmolLM3, Gemma 3), every layer."""
    params = dict(model.state_dict())
    if unsupported(model.cfg) or any(t.dtype != torch.float32 for t in params.values()):
        return None
    return _DecoderWriter(model, params).write(last_position_logits)


class _DecoderWriter(_Writer):
    """CanonicalDecoder.forward's nodes, in the order and form the exporter leaves them; one graph per writer.
    `write` keeps the sizes the layers' shapes read (seq_1d, batch_1d, total_1d) and the additive mask."""

    def __init__(self, model: CanonicalDecoder, params: dict[str, torch.Tensor]):
        cfg = self.cfg = model.cfg
        self.model, self.params = model, params
        kv_in = [B, cfg.num_kv_heads, P, cfg.head_dim]
        self.inputs = [ir.Value(name="input_ids", type=ir.TensorType(I64), shape=ir.Shape([B, S])),
                       ir.Value(name="attention_mask", type=ir.TensorType(I64),
                                shape=ir.Shape([B, ir.SymbolicDim(TOTAL)])),
                       ir.Value(name="position_ids", type=ir.TensorType(I64), shape=ir.Shape([B, S]))]
        self.inputs += [ir.Value(name=f"past_key_values.{i}.{kind}", type=ir.TensorType(F), shape=ir.Shape(kv_in))
                        for i in range(cfg.num_layers) for kind in ("key", "value")]
        super().__init__(ir.Graph(self.inputs, [], nodes=[], opset_imports={"": OPSET}, name="main_graph"))
        self.half = cfg.rotary_dim // 2

    def write(self, last_position_logits: bool) -> ir.Model:
        cfg = self.cfg
        ids, mask, positions = self.inputs[:3]
        # Sizes: the sequence length as [1] and as a scalar, the batch as [1], past + seq as a scalar and as [1].
        self.seq_1d = self.op("Shape", [ids], [1], I64, [SIZE_SCOPE, "sym_size_int"], start=1, end=2)
        seq = self.op("Squeeze", [self.seq_1d], [], I64, [SIZE_SCOPE, "sym_size_int"])
        self.batch_1d = self.op("Shape", [mask], [1], I64, [SIZE_SCOPE, "sym_size_int"], start=0, end=1)
        past_1d = self.op("Shape", [self.inputs[3]], [1], I64, [SIZE_SCOPE, "sym_size_int"], start=2, end=3)
        past = self.op("Squeeze", [past_1d], [], I64, [SIZE_SCOPE, "sym_size_int"])
        total = self.op("Add", [past, seq], [], I64, [SIZE_SCOPE, "add"])

        # Tied as the module's tensors are (the trace sees those, whatever the configuration says).
        tied = self.model.lm_head.weight is self.model.model.embed_tokens.weight
        embed_name = "lm_head.weight" if tied else "model.embed_tokens.weight"
        embed_weight = self.parameter(embed_name, self.params[embed_name], transposed=False)
        x = self.op("Gather", [embed_weight, ids], [B, S, cfg.hidden_size], F, ["", "model.embed_tokens", "embedding"],
                    axis=0)
        if cfg.embed_scale != 1.0:
            x = self.op("Mul", [x, self.float_scalar(cfg.embed_scale)], [B, S, cfg.hidden_size], F,
                        ["", "model.embed_tokens", "mul"])

        # In CanonicalDecoder.layer_inputs' order; a layer without rope rotates by angle 0 (none_rope_as_identity),
        # the others by the tables the module holds, as the trace reads them.
        kinds = set(cfg.layer_rope or ("global",))
        ropes = {}
        if "none" in kinds:
            ropes["none"] = self.rope_tables(positions, np.zeros(self.half), 1.0)
        if "global" in kinds:
            ropes["global"] = self.rope_tables(positions, self.model.rope_inv_freq.numpy(), cfg.rope_attention_scaling)
        if "local" in kinds:
            ropes["local"] = self.rope_tables(positions, self.model.local_rope_inv_freq.numpy(),
                                              cfg.local_rope_attention_scaling)
        self.mask = self.additive_mask(mask, past, total)

        presents = []
        for index in range(cfg.num_layers):
            x, key, value = self.layer(index, x, ropes[cfg.rope_of(index)], self.inputs[3 + 2 * index: 5 + 2 * index])
            presents += [key, value]

        x = self.rms_norm(x, "model.norm", [B, S, cfg.hidden_size], [""])
        rows = 1 if last_position_logits else S
        if last_position_logits:
            x = self.op("Slice", [x, self.ints(-1), self.ints(INT64_MAX), self.ints(1), self.ints(1)],
                        [B, 1, cfg.hidden_size], F, ["", "slice"])
        head_scopes = ["", "lm_head", "linear"]
        if tied:
            # One tensor read by the Gather and the head: the exporter transposes it in the graph, not as a copy.
            head = self.op("Transpose", [embed_weight], [cfg.hidden_size, cfg.vocab_size], F, head_scopes, perm=[1, 0])
        else:
            head = self.parameter("lm_head.weight", self.params["lm_head.weight"], transposed=True)
        logits = self.op("MatMul", [x, head], [B, rows, cfg.vocab_size], F, head_scopes)
        logits.name = "logits"
        self.graph.outputs.extend([logits, *presents])
        return ir.Model(self.graph, ir_version=IR_VERSION, producer_name="edgec")

    def rope_tables(self, positions: ir.Value, inv_freq: np.ndarray, scaling: float) -> tuple[ir.Value, ir.Value]:
        """cos and sin [batch, 1, seq, rotary_dim] of position_ids times the inverse frequencies (times
        the attention scaling of yarn and longrope tables)."""
        half, one = self.half, self.ints(1)
        inv_freq = self.constant(inv_freq.astype(np.float32).reshape(1, half, 1), np.float32)
        freqs_shape = self.op("Concat", [self.batch_1d, one, one], [3], I64, ["", "expand"], axis=0)
        freqs = self.op("Expand", [inv_freq, freqs_shape], [B, half, 1], F, ["", "expand"])
        pos = self.op("Unsqueeze", [positions, one], [B, 1, S], I64, ["", "unsqueeze"])
        pos = self.op("Cast", [pos], [B, 1, S], F, ["", "_to_copy"], to=int(F))
        angles = self.op("MatMul", [freqs, pos], [B, half, S], F, ["", "matmul"])
        angles = self.op("Transpose", [angles], [B, S, half], F, ["", "transpose"], perm=[0, 2, 1])
        angles = self.op("Concat", [angles, angles], [B, S, 2 * half], F, ["", "cat"], axis=-1)
        cos = self.op("Cos", [angles], [B, S, 2 * half], F, ["", "cos"])
        sin = self.op("Sin", [angles], [B, S, 2 * half], F, ["", "sin"])
        if scaling != 1.0:
            cos = self.op("Mul", [cos, self.float_scalar(scaling)], [B, S, 2 * half], F, ["", "mul"])
            sin = self.op("Mul", [sin, self.float_scalar(scaling)], [B, S, 2 * half], F, ["", "mul"])
        return (self.op("Unsqueeze", [cos, one], [B, 1, S, 2 * half], F, ["", "unsqueeze"]),
                self.op("Unsqueeze", [sin, one], [B, 1, S, 2 * half], F, ["", "unsqueeze"]))

    def additive_mask(self, mask: ir.Value, past: ir.Value, total: ir.Value) -> ir.Value:
        """[batch, 1, seq, past + seq]: causal over absolute positions, then the padding; keeps past + seq as
        [1] (total_1d) for the layers' shapes."""
        one = self.ints(1)
        query_pos = self.op("Range", [past, total, self.int_scalar(1)], [S], I64, ["", "arange"])
        self.total_1d = self.op("Reshape", [total, self.ints(-1)], [1], I64, ["", "full"], allowzero=0)
        full_shape = self.op("Concat", [self.seq_1d, self.total_1d], [2], I64, ["", "full"], axis=0)
        minimum = self.float_scalar(FLOAT_MIN)
        causal = self.op("Expand", [minimum, full_shape], [S, T], F, ["", "full"])
        key_pos = self.op("Range", [self.int_scalar(0), total, self.int_scalar(1)], [T], I64, ["", "arange"])
        query_col = self.op("Reshape", [query_pos, self.ints(-1, 1)], [S, 1], I64, ["", "view"], allowzero=1)
        future = self.op("Greater", [key_pos, query_col], [S, T], BOOL, ["", "gt"])
        future = self.op("Cast", [future], [S, T], F, ["", "convert_element_type_default"], to=int(F))
        causal = self.op("Mul", [causal, future], [S, T], F, ["", "mul"])
        causal = self.op("Unsqueeze", [causal, self.ints(0, 1)], [1, 1, S, T], F, ["", "unsqueeze"])
        causal_shape = self.op("Concat", [self.batch_1d, one, one, one], [4], I64, ["", "expand"], axis=0)
        causal = self.op("Expand", [causal, causal_shape], [B, 1, S, T], F, ["", "expand"])
        mask_length = ir.SymbolicDim(None)  # the exporter's own symbol for it
        padding = self.op("Unsqueeze", [mask, self.ints(1, 2)], [B, 1, 1, mask_length], I64, ["", "unsqueeze"])
        padding = self.op("Cast", [padding], [B, 1, 1, mask_length], F, ["", "_to_copy"], to=int(F))
        padded = self.op("Add", [causal, padding], [B, 1, S, T], F, ["", "add"])
        padded = self.op("Equal", [padded, self.float_scalar(0.0)], [B, 1, S, T], BOOL, ["", "eq"])
        return self.op("Where", [padded, minimum, causal], [B, 1, S, T], F, ["", "masked_fill"])

    def rms_norm(self, x: ir.Value, module: str, shape: list, scopes: list[str]) -> ir.Value:
        scopes = [*scopes, module]
        reduced = [*shape[:-1], 1]
        y = self.op("Pow", [x, self.float_scalar(2.0)], shape, F, [*scopes, "pow"])
        y = self.op("ReduceMean", [y, self.ints(-1)], reduced, F, [*scopes, "mean"], keepdims=1,
                    noop_with_empty_axes=0)
        y = self.op("Add", [y, self.float_scalar(self.cfg.rms_norm_eps)], reduced, F, [*scopes, "add"])
        y = self.op("Sqrt", [y], reduced, F, [*scopes, "rsqrt"])
        y = self.op("Reciprocal", [y], reduced, F, [*scopes, "rsqrt"])
        y = self.op("Mul", [x, y], shape, F, [*scopes, "mul"])
        weight = self.parameter(f"{module}.weight", self.params[f"{module}.weight"], transposed=False)
        return self.op("Mul", [weight, y], shape, F, [*scopes, "mul"])

    def linear(self, x: ir.Value, module: str, outputs: int, scopes: list[str]) -> ir.Value:
        scopes = [*scopes, module, "linear"]
        weight = self.parameter(f"{module}.weight", self.params[f"{module}.weight"], transposed=True)
        y = self.op("MatMul", [x, weight], [B, S, outputs], F, scopes)
        bias = self.params.get(f"{module}.bias")
        if bias is None:
            return y
        return self.op("Add", [y, self.parameter(f"{module}.bias", bias, transposed=False)], [B, S, outputs], F,
                       scopes)

    def layer(self, index: int, x: ir.Value, rope: tuple[ir.Value, ir.Value],
              past: list[ir.Value]) -> tuple[ir.Value, ir.Value, ir.Value]:
        """Layer `index`'s nodes: (its output, present key, present value)."""
        cfg, hidden = self.cfg, self.cfg.hidden_size
        layer = f"model.layers.{index}"
        x, present_key, present_value = self.attention(index, x, rope, past)
        normed = self.rms_norm(x, f"{layer}.post_attention_layernorm", [B, S, hidden], ["", layer])
        y = self.mlp(normed, f"{layer}.mlp", ["", layer])
        if cfg.sandwich_norms:
            y = self.rms_norm(y, f"{layer}.mlp_output_norm", [B, S, hidden], ["", layer])
        return self.op("Add", [x, y], [B, S, hidden], F, ["", layer, "add"]), present_key, present_value

    def attention(self, index: int, x: ir.Value, rope: tuple[ir.Value, ir.Value],
                  past: list[ir.Value]) -> tuple[ir.Value, ir.Value, ir.Value]:
        """input_layernorm, attention over the cache, o_proj and the residual add: (x, present key, value)."""
        cfg = self.cfg
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        layer = f"model.layers.{index}"
        attn = f"{layer}.self_attn"
        in_attn = ["", layer, attn]
        normed = self.rms_norm(x, f"{layer}.input_layernorm", [B, S, cfg.hidden_size], ["", layer])
        q = self.heads(normed, f"{attn}.q_proj", nh, in_attn)
        k = self.heads(normed, f"{attn}.k_proj", nkv, in_attn)
        v = self.heads(normed, f"{attn}.v_proj", nkv, in_attn)
        if cfg.qk_norm:
            q = self.rms_norm(q, f"{attn}.q_norm", [B, nh, S, hd], in_attn)
            k = self.rms_norm(k, f"{attn}.k_norm", [B, nkv, S, hd], in_attn)
        q, k = self.rotate(q, nh, rope, in_attn), self.rotate(k, nkv, rope, in_attn)
        present = [B, nkv, ir.SymbolicDim(TOTAL), hd]
        present_key = self.op("Concat", [past[0], k], present, F, [*in_attn, "cat"], axis=-2)
        present_value = self.op("Concat", [past[1], v], present, F, [*in_attn, "cat"], axis=-2)
        present_key.name, present_value.name = f"present.{index}.key", f"present.{index}.value"

        # Grouped-query attention written out: each KV head serves num_heads / num_kv_heads query heads.
        keys = self.spread(present_key, in_attn)
        values = self.spread(present_value, in_attn)
        spread_shape = self.op("Concat", [self.batch_1d, self.ints(nh), self.total_1d, self.ints(hd)], [4], I64,
                               [*in_attn, "_unsafe_view"], axis=0)
        keys = self.op("Reshape", [keys, spread_shape], [B, nh, T, hd], F, [*in_attn, "_unsafe_view"], allowzero=1)
        values = self.op("Reshape", [values, spread_shape], [B, nh, T, hd], F, [*in_attn, "_unsafe_view"],
                         allowzero=1)
        keys = self.op("Transpose", [keys], [B, nh, hd, T], F, [*in_attn, "transpose"], perm=[0, 1, 3, 2])
        scores = self.op("MatMul", [q, keys], [B, nh, S, T], F, [*in_attn, "matmul"])
        scale = cfg.attention_scale if cfg.attention_scale is not None else hd**-0.5
        scores = self.op("Mul", [scores, self.float_scalar(scale)], [B, nh, S, T], F, [*in_attn, "mul"])
        scores = self.op("Add", [scores, self.mask], [B, nh, S, T], F, [*in_attn, "add"])
        probs = self.op("Softmax", [scores], [B, nh, S, T], F, [*in_attn, "softmax"], axis=-1)
        out = self.op("MatMul", [probs, values], [B, nh, S, hd], F, [*in_attn, "matmul"])
        out = self.op("Transpose", [out], [B, S, nh, hd], F, [*in_attn, "transpose"], perm=[0, 2, 1, 3])
        merged_shape = self.op("Concat", [self.batch_1d, self.seq_1d, self.ints(nh * hd)], [3], I64,
                               [*in_attn, "_unsafe_view"], axis=0)
        out = self.op("Reshape", [out, merged_shape], [B, S, nh * hd], F, [*in_attn, "_unsafe_view"], allowzero=1)
        out = self.linear(out, f"{attn}.o_proj", cfg.hidden_size, in_attn)
        if cfg.sandwich_norms:
            out = self.rms_norm(out, f"{layer}.attention_output_norm", [B, S, cfg.hidden_size], ["", layer])
        x = self.op("Add", [x, out], [B, S, cfg.hidden_size], F, ["", layer, "add"])
        return x, present_key, present_value

    def heads(self, x: ir.Value, module: str, count: int, scopes: list[str]) -> ir.Value:
        """A projection as heads [batch, count, seq, head_dim]."""
        hd = self.cfg.head_dim
        y = self.linear(x, module, count * hd, scopes)
        shape = self.op("Concat", [self.batch_1d, self.seq_1d, self.ints(count), self.ints(hd)], [4], I64,
                        [*scopes, "view"], axis=0)
        y = self.op("Reshape", [y, shape], [B, S, count, hd], F, [*scopes, "view"], allowzero=1)
        return self.op("Transpose", [y], [B, count, S, hd], F, [*scopes, "transpose"], perm=[0, 2, 1, 3])

    def rotate(self, x: ir.Value, count: int, rope: tuple[ir.Value, ir.Value], scopes: list[str]) -> ir.Value:
        """x * cos + rotate_half(x) * sin over the first rotary_dim dimensions."""
        cos, sin = rope
        half, hd = self.half, self.cfg.head_dim
        full, halved = [B, count, S, 2 * half], [B, count, S, half]
        axis, step = self.ints(3), self.ints(1)
        kept = None
        if 2 * half != hd:  # partial rotary: the dimensions past rotary_dim pass unrotated
            rotary = self.op("Slice", [x, self.ints(0), self.ints(2 * half), axis, step], full, F, [*scopes, "slice"])
            kept = self.op("Slice", [x, self.ints(2 * half), self.ints(INT64_MAX), axis, step],
                           [B, count, S, hd - 2 * half], F, [*scopes, "slice"])
            x = rotary
        turned = self.op("Mul", [x, cos], full, F, [*scopes, "mul"])
        upper = self.op("Slice", [x, self.ints(half), self.ints(INT64_MAX), axis, step], halved, F, [*scopes, "slice"])
        upper = self.op("Neg", [upper], halved, F, [*scopes, "neg"])
        lower = self.op("Slice", [x, self.ints(0), self.ints(half), axis, step], halved, F, [*scopes, "slice"])
        rotated = self.op("Concat", [upper, lower], full, F, [*scopes, "cat"], axis=-1)
        rotated = self.op("Mul", [rotated, sin], full, F, [*scopes, "mul"])
        rotated = self.op("Add", [turned, rotated], full, F, [*scopes, "add"])
        if kept is None:
            return rotated
        return self.op("Concat", [rotated, kept], [B, count, S, hd], F, [*scopes, "cat"], axis=-1)

    def spread(self, cache: ir.Value, scopes: list[str]) -> ir.Value:
        """[batch, kv_heads, total, head_dim] -> [batch, kv_heads, groups, total, head_dim]."""
        nkv, hd = self.cfg.num_kv_heads, self.cfg.head_dim
        groups = self.cfg.num_heads // nkv
        y = self.op("Unsqueeze", [cache, self.ints(2)], [B, nkv, 1, T, hd], F, [*scopes, "unsqueeze"])
        shape = self.op("Concat", [self.batch_1d, self.ints(nkv), self.ints(groups), self.total_1d, self.ints(hd)],
                        [5], I64, [*scopes, "expand"], axis=0)
        return self.op("Expand", [y, shape], [B, nkv, groups, T, hd], F, [*scopes, "expand"])

    def mlp(self, x: ir.Value, mlp: str, scopes: list[str]) -> ir.Value:
        """down(act(gate(x)) * up(x))."""
        inner = self.cfg.intermediate_size
        scopes = [*scopes, mlp]
        gate = self.linear(x, f"{mlp}.gate_proj", inner, scopes)
        if self.cfg.hidden_act == "silu":
            gated = self.op("Sigmoid", [gate], [B, S, inner], F, [*scopes, f"{mlp}.act", "silu"])
            gate = self.op("Mul", [gate, gated], [B, S, inner], F, [*scopes, f"{mlp}.act", "silu"])
        else:  # gelu_pytorch_tanh
            gate = self.op("Gelu", [gate], [B, S, inner], F, [*scopes, f"{mlp}.act", "gelu"], approximate="tanh")
        up = self.linear(x, f"{mlp}.up_proj", inner, scopes)
        y = self.op("Mul", [gate, up], [B, S, inner], F, [*scopes, "mul"])
        return self.linear(y, f"{mlp}.down_proj", self.cfg.hidden_size, scopes)
