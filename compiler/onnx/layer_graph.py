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

BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
# The exporter's name for past + seq inside the graph (graph outputs name it TOTAL).
PAST_PLUS_SEQ = "past_sequence_length + sequence_length"
OPSET = 20
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


F, I64, BOOL = ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.BOOL


def write_decoder(model: CanonicalDecoder, last_position_logits: bool) -> ir.Model | None:
    """The decoder's graph, equal to what export._trace makes of it (node for node, names aside); None when
    `unsupported`. The export writes a one-layer view and stamps it, or, where layers rotate differently
    (SmolLM3's layers without rope), every layer."""
    cfg = model.cfg
    params = dict(model.state_dict())
    if unsupported(cfg) or any(t.dtype != torch.float32 for t in params.values()):
        return None
    H, V, nh, nkv, hd = cfg.hidden_size, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    half = cfg.rotary_dim // 2
    B, S, P, T = (ir.SymbolicDim(n) for n in (BATCH, SEQUENCE, PAST, PAST_PLUS_SEQ))
    kv_in = [B, nkv, P, hd]
    inputs = [ir.Value(name="input_ids", type=ir.TensorType(I64), shape=ir.Shape([B, S])),
              ir.Value(name="attention_mask", type=ir.TensorType(I64), shape=ir.Shape([B, ir.SymbolicDim(TOTAL)])),
              ir.Value(name="position_ids", type=ir.TensorType(I64), shape=ir.Shape([B, S]))]
    inputs += [ir.Value(name=f"past_key_values.{i}.{kind}", type=ir.TensorType(F), shape=ir.Shape(kv_in))
               for i in range(cfg.num_layers) for kind in ("key", "value")]
    ids, mask, positions = inputs[:3]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": OPSET}, name="main_graph")
    w = _Writer(graph)
    top = ""
    size_scope = "_empty_nn_module_stack_from_metadata_hook"

    # Sizes: the sequence length as [1] and as a scalar, the batch as [1], past + seq as a scalar.
    seq_1d = w.op("Shape", [ids], [1], I64, [size_scope, "sym_size_int"], start=1, end=2)
    seq = w.op("Squeeze", [seq_1d], [], I64, [size_scope, "sym_size_int"])
    batch_1d = w.op("Shape", [mask], [1], I64, [size_scope, "sym_size_int"], start=0, end=1)
    past_1d = w.op("Shape", [inputs[3]], [1], I64, [size_scope, "sym_size_int"], start=2, end=3)
    past = w.op("Squeeze", [past_1d], [], I64, [size_scope, "sym_size_int"])
    total = w.op("Add", [past, seq], [], I64, [size_scope, "add"])

    # Tied as the module's tensors are (the trace sees those, whatever the configuration says).
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    embed_name = "lm_head.weight" if tied else "model.embed_tokens.weight"
    embed_weight = w.parameter(embed_name, params[embed_name], transposed=False)
    x = w.op("Gather", [embed_weight, ids], [B, S, H], F, [top, "model.embed_tokens", "embedding"], axis=0)
    if cfg.embed_scale != 1.0:
        x = w.op("Mul", [x, w.float_scalar(cfg.embed_scale)], [B, S, H], F, [top, "model.embed_tokens", "mul"])

    one = w.ints(1)

    def rope_tables(inv_freq: np.ndarray, scaling: float):
        """cos and sin [batch, 1, seq, rotary_dim] of position_ids times the inverse frequencies (times
        the attention scaling of yarn and longrope tables)."""
        inv_freq = w.constant(inv_freq.astype(np.float32).reshape(1, half, 1), np.float32)
        freqs_shape = w.op("Concat", [batch_1d, one, one], [3], I64, [top, "expand"], axis=0)
        freqs = w.op("Expand", [inv_freq, freqs_shape], [B, half, 1], F, [top, "expand"])
        pos = w.op("Unsqueeze", [positions, one], [B, 1, S], I64, [top, "unsqueeze"])
        pos = w.op("Cast", [pos], [B, 1, S], F, [top, "_to_copy"], to=int(F))
        angles = w.op("MatMul", [freqs, pos], [B, half, S], F, [top, "matmul"])
        angles = w.op("Transpose", [angles], [B, S, half], F, [top, "transpose"], perm=[0, 2, 1])
        angles = w.op("Concat", [angles, angles], [B, S, 2 * half], F, [top, "cat"], axis=-1)
        cos = w.op("Cos", [angles], [B, S, 2 * half], F, [top, "cos"])
        sin = w.op("Sin", [angles], [B, S, 2 * half], F, [top, "sin"])
        if scaling != 1.0:
            cos = w.op("Mul", [cos, w.float_scalar(scaling)], [B, S, 2 * half], F, [top, "mul"])
            sin = w.op("Mul", [sin, w.float_scalar(scaling)], [B, S, 2 * half], F, [top, "mul"])
        return (w.op("Unsqueeze", [cos, one], [B, 1, S, 2 * half], F, [top, "unsqueeze"]),
                w.op("Unsqueeze", [sin, one], [B, 1, S, 2 * half], F, [top, "unsqueeze"]))

    # In CanonicalDecoder.layer_inputs' order; a layer without rope rotates by angle 0 (none_rope_as_identity).
    kinds = set(cfg.layer_rope or ("global",))
    ropes = {}
    if "none" in kinds:
        ropes["none"] = rope_tables(np.zeros(half), 1.0)
    if "global" in kinds:  # the tables the module holds, as the trace reads them
        ropes["global"] = rope_tables(model.rope_inv_freq.numpy(), cfg.rope_attention_scaling)
    if "local" in kinds:
        ropes["local"] = rope_tables(model.local_rope_inv_freq.numpy(), cfg.local_rope_attention_scaling)

    # The additive mask [batch, 1, seq, past + seq]: causal over absolute positions, then the padding.
    query_pos = w.op("Range", [past, total, w.int_scalar(1)], [S], I64, [top, "arange"])
    total_1d = w.op("Reshape", [total, w.ints(-1)], [1], I64, [top, "full"], allowzero=0)
    full_shape = w.op("Concat", [seq_1d, total_1d], [2], I64, [top, "full"], axis=0)
    minimum = w.float_scalar(FLOAT_MIN)
    causal = w.op("Expand", [minimum, full_shape], [S, T], F, [top, "full"])
    key_pos = w.op("Range", [w.int_scalar(0), total, w.int_scalar(1)], [T], I64, [top, "arange"])
    query_col = w.op("Reshape", [query_pos, w.ints(-1, 1)], [S, 1], I64, [top, "view"], allowzero=1)
    future = w.op("Greater", [key_pos, query_col], [S, T], BOOL, [top, "gt"])
    future = w.op("Cast", [future], [S, T], F, [top, "convert_element_type_default"], to=int(F))
    causal = w.op("Mul", [causal, future], [S, T], F, [top, "mul"])
    causal = w.op("Unsqueeze", [causal, w.ints(0, 1)], [1, 1, S, T], F, [top, "unsqueeze"])
    causal_shape = w.op("Concat", [batch_1d, one, one, one], [4], I64, [top, "expand"], axis=0)
    causal = w.op("Expand", [causal, causal_shape], [B, 1, S, T], F, [top, "expand"])
    mask_length = ir.SymbolicDim(None)  # the exporter's own symbol for it
    padding = w.op("Unsqueeze", [mask, w.ints(1, 2)], [B, 1, 1, mask_length], I64, [top, "unsqueeze"])
    padding = w.op("Cast", [padding], [B, 1, 1, mask_length], F, [top, "_to_copy"], to=int(F))
    padded = w.op("Add", [causal, padding], [B, 1, S, T], F, [top, "add"])
    padded = w.op("Equal", [padded, w.float_scalar(0.0)], [B, 1, S, T], BOOL, [top, "eq"])
    additive_mask = w.op("Where", [padded, minimum, causal], [B, 1, S, T], F, [top, "masked_fill"])

    eps = w.float_scalar(cfg.rms_norm_eps)

    def rms_norm(x, module: str, shape: list, scopes: list[str]):
        scopes = [*scopes, module]
        reduced = [*shape[:-1], 1]
        y = w.op("Pow", [x, w.float_scalar(2.0)], shape, F, [*scopes, "pow"])
        y = w.op("ReduceMean", [y, w.ints(-1)], reduced, F, [*scopes, "mean"], keepdims=1, noop_with_empty_axes=0)
        y = w.op("Add", [y, eps], reduced, F, [*scopes, "add"])
        y = w.op("Sqrt", [y], reduced, F, [*scopes, "rsqrt"])
        y = w.op("Reciprocal", [y], reduced, F, [*scopes, "rsqrt"])
        y = w.op("Mul", [x, y], shape, F, [*scopes, "mul"])
        weight = w.parameter(f"{module}.weight", params[f"{module}.weight"], transposed=False)
        return w.op("Mul", [weight, y], shape, F, [*scopes, "mul"])

    def linear(x, module: str, outputs: int, scopes: list[str]):
        scopes = [*scopes, module, "linear"]
        weight = w.parameter(f"{module}.weight", params[f"{module}.weight"], transposed=True)
        y = w.op("MatMul", [x, weight], [B, S, outputs], F, scopes)
        bias = params.get(f"{module}.bias")
        if bias is None:
            return y
        return w.op("Add", [y, w.parameter(f"{module}.bias", bias, transposed=False)], [B, S, outputs], F, scopes)

    presents = []
    for index in range(cfg.num_layers):
        x, key, value = _layer(w, index, x, ropes[cfg.rope_of(index)], inputs[3 + 2 * index: 5 + 2 * index],
                               additive_mask, (batch_1d, seq_1d, total_1d), rms_norm, linear, cfg)
        presents += [key, value]

    x = rms_norm(x, "model.norm", [B, S, H], [top])
    rows = 1 if last_position_logits else S
    if last_position_logits:
        x = w.op("Slice", [x, w.ints(-1), w.ints(INT64_MAX), w.ints(1), w.ints(1)], [B, 1, H], F, [top, "slice"])
    head_scopes = [top, "lm_head", "linear"]
    if tied:
        # One tensor read by the Gather and the head: the exporter transposes it in the graph, not as a copy.
        head = w.op("Transpose", [embed_weight], [H, V], F, head_scopes, perm=[1, 0])
    else:
        head = w.parameter("lm_head.weight", params["lm_head.weight"], transposed=True)
    logits = w.op("MatMul", [x, head], [B, rows, V], F, head_scopes)
    logits.name = "logits"
    graph.outputs.extend([logits, *presents])
    return ir.Model(graph, ir_version=10, producer_name="edgec")


def _layer(w: _Writer, index: int, x: ir.Value, rope: tuple[ir.Value, ir.Value], past: list[ir.Value],
           additive_mask: ir.Value, sizes: tuple[ir.Value, ir.Value, ir.Value], rms_norm, linear,
           cfg: DecoderConfig) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Layer `index`'s nodes: (its output, present key, present value)."""
    H, nh, nkv, hd, half = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim // 2
    B, S, T = (ir.SymbolicDim(n) for n in (BATCH, SEQUENCE, PAST_PLUS_SEQ))
    batch_1d, seq_1d, total_1d = sizes
    cos, sin = rope
    layer = f"model.layers.{index}"
    in_layer = ["", layer]
    attn = f"{layer}.self_attn"
    in_attn = [*in_layer, attn]

    def heads(x, module: str, count: int):
        y = linear(x, f"{attn}.{module}", count * hd, in_attn)
        shape = w.op("Concat", [batch_1d, seq_1d, w.ints(count), w.ints(hd)], [4], I64, [*in_attn, "view"], axis=0)
        y = w.op("Reshape", [y, shape], [B, S, count, hd], F, [*in_attn, "view"], allowzero=1)
        return w.op("Transpose", [y], [B, count, S, hd], F, [*in_attn, "transpose"], perm=[0, 2, 1, 3])

    def rotate(x, count: int):
        full, halved = [B, count, S, 2 * half], [B, count, S, half]
        axis, step = w.ints(3), w.ints(1)
        kept = None
        if 2 * half != hd:  # partial rotary: the dimensions past rotary_dim pass unrotated
            x, kept = (w.op("Slice", [x, w.ints(0), w.ints(2 * half), axis, step], full, F, [*in_attn, "slice"]),
                       w.op("Slice", [x, w.ints(2 * half), w.ints(INT64_MAX), axis, step], [B, count, S, hd - 2 * half],
                            F, [*in_attn, "slice"]))
        turned = w.op("Mul", [x, cos], full, F, [*in_attn, "mul"])
        upper = w.op("Slice", [x, w.ints(half), w.ints(INT64_MAX), axis, step], halved, F, [*in_attn, "slice"])
        upper = w.op("Neg", [upper], halved, F, [*in_attn, "neg"])
        lower = w.op("Slice", [x, w.ints(0), w.ints(half), axis, step], halved, F, [*in_attn, "slice"])
        rotated = w.op("Concat", [upper, lower], full, F, [*in_attn, "cat"], axis=-1)
        rotated = w.op("Mul", [rotated, sin], full, F, [*in_attn, "mul"])
        rotated = w.op("Add", [turned, rotated], full, F, [*in_attn, "add"])
        if kept is None:
            return rotated
        return w.op("Concat", [rotated, kept], [B, count, S, hd], F, [*in_attn, "cat"], axis=-1)

    normed = rms_norm(x, f"{layer}.input_layernorm", [B, S, H], in_layer)
    q, k, v = heads(normed, "q_proj", nh), heads(normed, "k_proj", nkv), heads(normed, "v_proj", nkv)
    if cfg.qk_norm:
        q = rms_norm(q, f"{attn}.q_norm", [B, nh, S, hd], in_attn)
        k = rms_norm(k, f"{attn}.k_norm", [B, nkv, S, hd], in_attn)
    q, k = rotate(q, nh), rotate(k, nkv)
    present = [B, nkv, ir.SymbolicDim(TOTAL), hd]
    present_key = w.op("Concat", [past[0], k], present, F, [*in_attn, "cat"], axis=-2)
    present_value = w.op("Concat", [past[1], v], present, F, [*in_attn, "cat"], axis=-2)
    present_key.name, present_value.name = f"present.{index}.key", f"present.{index}.value"

    # Grouped-query attention written out: each KV head serves num_heads / num_kv_heads query heads.
    groups = nh // nkv
    grouped = [B, nkv, groups, T, hd]

    def spread(cache):
        y = w.op("Unsqueeze", [cache, w.ints(2)], [B, nkv, 1, T, hd], F, [*in_attn, "unsqueeze"])
        group_shape = w.op("Concat", [batch_1d, w.ints(nkv), w.ints(groups), total_1d, w.ints(hd)], [5], I64,
                           [*in_attn, "expand"], axis=0)
        return w.op("Expand", [y, group_shape], grouped, F, [*in_attn, "expand"])

    keys, values = spread(present_key), spread(present_value)
    spread_shape = w.op("Concat", [batch_1d, w.ints(nh), total_1d, w.ints(hd)], [4], I64,
                        [*in_attn, "_unsafe_view"], axis=0)
    keys = w.op("Reshape", [keys, spread_shape], [B, nh, T, hd], F, [*in_attn, "_unsafe_view"], allowzero=1)
    values = w.op("Reshape", [values, spread_shape], [B, nh, T, hd], F, [*in_attn, "_unsafe_view"], allowzero=1)
    keys = w.op("Transpose", [keys], [B, nh, hd, T], F, [*in_attn, "transpose"], perm=[0, 1, 3, 2])
    scores = w.op("MatMul", [q, keys], [B, nh, S, T], F, [*in_attn, "matmul"])
    scale = cfg.attention_scale if cfg.attention_scale is not None else hd**-0.5
    scores = w.op("Mul", [scores, w.float_scalar(scale)], [B, nh, S, T], F, [*in_attn, "mul"])
    scores = w.op("Add", [scores, additive_mask], [B, nh, S, T], F, [*in_attn, "add"])
    probs = w.op("Softmax", [scores], [B, nh, S, T], F, [*in_attn, "softmax"], axis=-1)
    out = w.op("MatMul", [probs, values], [B, nh, S, hd], F, [*in_attn, "matmul"])
    out = w.op("Transpose", [out], [B, S, nh, hd], F, [*in_attn, "transpose"], perm=[0, 2, 1, 3])
    merged_shape = w.op("Concat", [batch_1d, seq_1d, w.ints(nh * hd)], [3], I64, [*in_attn, "_unsafe_view"], axis=0)
    out = w.op("Reshape", [out, merged_shape], [B, S, nh * hd], F, [*in_attn, "_unsafe_view"], allowzero=1)
    out = linear(out, f"{attn}.o_proj", H, in_attn)
    if cfg.sandwich_norms:
        out = rms_norm(out, f"{layer}.attention_output_norm", [B, S, H], in_layer)
    x = w.op("Add", [x, out], [B, S, H], F, [*in_layer, "add"])

    mlp = f"{layer}.mlp"
    in_mlp = [*in_layer, mlp]
    normed = rms_norm(x, f"{layer}.post_attention_layernorm", [B, S, H], in_layer)
    inner = cfg.intermediate_size
    gate = linear(normed, f"{mlp}.gate_proj", inner, in_mlp)
    if cfg.hidden_act == "silu":
        gated = w.op("Sigmoid", [gate], [B, S, inner], F, [*in_mlp, f"{mlp}.act", "silu"])
        gate = w.op("Mul", [gate, gated], [B, S, inner], F, [*in_mlp, f"{mlp}.act", "silu"])
    else:  # gelu_pytorch_tanh
        gate = w.op("Gelu", [gate], [B, S, inner], F, [*in_mlp, f"{mlp}.act", "gelu"], approximate="tanh")
    up = linear(normed, f"{mlp}.up_proj", inner, in_mlp)
    y = w.op("Mul", [gate, up], [B, S, inner], F, [*in_mlp, "mul"])
    y = linear(y, f"{mlp}.down_proj", H, in_mlp)
    if cfg.sandwich_norms:
        y = rms_norm(y, f"{layer}.mlp_output_norm", [B, S, H], in_layer)
    return w.op("Add", [x, y], [B, S, H], F, [*in_layer, "add"]), present_key, present_value
