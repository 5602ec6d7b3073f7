"""Each ONNX pass on the smallest traced graph that has its pattern: rewrite counts, op types, and
outputs before/after compared in onnxruntime; and a graph where it must not fire."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from compiler.frontend.load import build_decoder, read_checkpoint
from compiler.onnx.export import export_onnx
from compiler.onnx.passes import CleanupPass, build_pipeline, op_counts, run_passes
from compiler.onnx.passes.fuse_gqa import FuseGroupQueryAttentionPass
from compiler.onnx.passes.fuse_rms_norm import FuseRmsNormPass
from compiler.onnx.passes.fuse_rotary import FuseRotaryEmbeddingPass
from compiler.onnx.passes.fuse_skip_rms_norm import FuseSkipRmsNormPass
from compiler.models.decoder import RMSNorm


def export_module(module, *args):
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, optimize=True, verbose=False)
    return program.model


def run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def apply(passes, model):
    model, records = run_passes(model, passes)
    return model, {k: v for r in records for k, v in r["rewrites"].items()}


class NormThenProject(torch.nn.Module):
    def __init__(self, subtract_mean=False):
        super().__init__()
        self.norm = RMSNorm(16, 1e-5)
        self.subtract_mean = subtract_mean
        with torch.no_grad():
            self.norm.weight.copy_(torch.linspace(0.5, 1.5, 16))

    def forward(self, x, residual):
        h = x + residual
        if self.subtract_mean:  # LayerNorm-like: not an RMSNorm, must not fuse
            h = h - h.mean(-1, keepdim=True)
        return self.norm(h) @ torch.ones(16, 4), h


FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32),
         "residual": np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32)}


def test_rms_norm_and_skip_fusions():
    module = NormThenProject()
    x, residual = (torch.from_numpy(v) for v in FEEDS.values())
    model = export_module(module, x, residual)
    model.graph.inputs[0].name, model.graph.inputs[1].name = "x", "residual"
    before = run(model, FEEDS)
    model, counts = apply([CleanupPass(), FuseRmsNormPass(), FuseSkipRmsNormPass(), CleanupPass()], model)
    assert counts["rms_normalization"] == 1 and counts["skip_rms_normalization"] == 1
    ops = op_counts(model)
    assert ops.get("SkipSimplifiedLayerNormalization") == 1
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal"} & set(ops)
    for a, b in zip(before, run(model, FEEDS)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_rms_norm_fusion_does_not_fire_on_layer_norm_like_graph():
    x, residual = (torch.from_numpy(v) for v in FEEDS.values())
    model = export_module(NormThenProject(subtract_mean=True), x, residual)
    model, counts = apply([CleanupPass(), FuseRmsNormPass()], model)
    # The mean-subtracted input still has an RMS step after it, which may fuse; the mean must stay.
    assert "ReduceMean" in op_counts(model)
    assert counts["rms_normalization"] <= 1


def test_cleanup_folds_constant_subgraphs_and_identities():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    a, b = (ir.Value(name=n, const_value=ir.tensor(np.full((3,), v, np.float32), name=n)) for n, v in (("a", 2), ("b", 3)))
    added = ir.node("Add", [a, b])
    kept = ir.node("Identity", [x])
    product = ir.node("Mul", [kept.outputs[0], added.outputs[0]])
    product.outputs[0].name = "y"
    graph = ir.Graph([x], product.outputs, nodes=[added, kept, product], initializers=[a, b], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    cleanup = CleanupPass()
    model, _ = apply([cleanup], model)
    assert cleanup.counts["foldable"] == 1  # the Add (the Identity goes first, on its own)
    assert op_counts(model) == {"Mul": 1}
    np.testing.assert_array_equal(run(model, feeds)[0], feeds["x"] * 5)


@pytest.mark.parametrize("variant, attention", [("llama3_tied", "fused"), ("phi4_longrope", "fused"), ("gemma3", "fused"),
                                                ("llama", "mha")])
def test_fusion_pipeline_leaves_nothing_for_onnxscripts_optimizer(model_dir, monkeypatch, variant, attention):
    """The pipeline's cleanups skip onnxscript's optimizer (seconds on a 30-layer graph) unless a node is
    foldable: the optimizer, run after them, must find nothing to change. phi4_longrope's rotary fusion leaves
    a function call to inline; gemma3 is written whole; with GroupQueryAttention's rules off, attention becomes
    MultiHeadAttention wrapped in transposes that cancel the exporter's. foldable == 0 is what keeps the
    optimizer from running: a speed check, which a harmless foldable node from a newer exporter would trip."""
    from onnxscript.optimizer import optimize

    import compiler.onnx.passes.fuse_gqa as fuse_gqa

    if attention == "mha":
        class NoRules:
            def apply_to_model(self, model):
                return 0

        monkeypatch.setattr(fuse_gqa, "gqa_rules", NoRules())
    decoder = build_decoder(read_checkpoint(model_dir(variant)))
    passes = build_pipeline("fuse", decoder.cfg)
    model, counts = apply(passes, export_onnx(decoder, last_position_logits=True))
    if attention == "mha":
        assert op_counts(model).get("MultiHeadAttention") == decoder.cfg.num_layers
    assert [p.counts["foldable"] for p in passes if isinstance(p, CleanupPass)] == [0, 0]
    assert not model.functions
    before = (op_counts(model), len(model.graph), dict(model.opset_imports), len(model.graph.initializers))
    optimize(model)
    assert (op_counts(model), len(model.graph), dict(model.opset_imports), len(model.graph.initializers)) == before


@pytest.fixture(scope="module")
def traced(model_dir):
    """name -> (canonical decoder, traced unfused ONNX model)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            decoder = build_decoder(read_checkpoint(model_dir(variant)))
            cache[variant] = (decoder, export_onnx(decoder))
        return cache[variant]

    return get


def decoder_feeds(decoder, past_len=3, seq=4, batch=1):
    rng = np.random.default_rng(5)
    cfg = decoder.cfg
    feeds = {
        "input_ids": rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, past_len + seq), np.int64),
        "position_ids": np.arange(past_len, past_len + seq, dtype=np.int64)[None].repeat(batch, 0),
    }
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(
                (batch, cfg.num_kv_heads, past_len, cfg.head_dim)).astype(np.float32)
    return feeds


def test_unfused_export_passes_the_onnx_checker(traced, tmp_path):
    _, model = traced("llama")
    path = tmp_path / "m.onnx"
    ir.save(model, str(path), external_data="m.onnx.data")
    onnx.checker.check_model(str(path), full_check=True)


def test_rotary_and_gqa_fusions_on_a_traced_decoder(traced):
    decoder, traced_model = traced("llama")
    model = ir.from_proto(ir.to_proto(traced_model))  # a copy: the fixture is shared
    feeds = decoder_feeds(decoder)
    before = run(model, feeds)
    passes = [CleanupPass(), FuseRmsNormPass(), FuseSkipRmsNormPass(),
              FuseRotaryEmbeddingPass(decoder.cfg.max_sequence_length),
              FuseGroupQueryAttentionPass(decoder.cfg.rotary_dim), CleanupPass()]
    model, counts = apply(passes, model)
    layers = decoder.cfg.num_layers
    assert counts["rotary_embedding"] == 2 * layers and counts["cos_sin_cache"] == 2 * layers
    assert counts["group_query_attention"] == layers
    ops = op_counts(model)
    assert ops["GroupQueryAttention"] == layers
    assert not {"Softmax", "Expand", "RotaryEmbedding", "Neg"} & set(ops)
    after = run(model, feeds)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_gqa_fusion_skips_when_rotary_tables_are_too_narrow(traced):
    decoder, traced_model = traced("phi3_partial_rotary")
    model = ir.from_proto(ir.to_proto(traced_model))
    feeds = decoder_feeds(decoder)
    before = run(model, feeds)
    model, counts = apply(build_pipeline("fuse", decoder.cfg), model)
    assert "GroupQueryAttention" not in op_counts(model)
    assert counts["skipped_rotary_dim_not_multiple_of_16"] == 1
    assert op_counts(model)["RotaryEmbedding"] == 2 * decoder.cfg.num_layers  # on the rotary half only
    for a, b in zip(before, run(model, feeds)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_a_failing_pass_is_named(traced):
    class BrokenPass(ir.passes.InPlacePass):
        def call(self, model):
            raise RuntimeError("boom")

    from compiler.errors import EdgecError

    with pytest.raises(EdgecError, match="BrokenPass failed: RuntimeError: boom"):
        run_passes(ir.from_proto(ir.to_proto(traced("llama")[1])), [BrokenPass()])


def test_pack_qkv_packs_projections_and_biases(traced):
    from compiler.onnx.passes.pack_qkv import PackQkvPass

    decoder, traced_model = traced("qwen2")  # q/k/v with biases
    model = ir.from_proto(ir.to_proto(traced_model))
    feeds = decoder_feeds(decoder)  # onnxruntime GQA: batch 1 when a prompt chunk follows a past
    before = run(model, feeds)
    passes = build_pipeline("fuse", decoder.cfg)
    model, counts = apply(passes, model)
    assert counts["packed_qkv"] == decoder.cfg.num_layers
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            assert node.inputs[1] is None and node.inputs[2] is None
            assert node.inputs[0].producer().op_type == "Add"  # the packed bias
    cfg = decoder.cfg
    assert op_counts(model)["MatMul"] == 5 * cfg.num_layers + 1  # qkv, o, gate, up, down; lm_head
    for a, b in zip(before, run(model, feeds)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    assert PackQkvPass()(model).modified is False  # nothing left to pack


def test_layer_template_export_equals_full_trace(model_dir):
    """One traced layer stamped N times computes exactly what tracing every layer computes."""
    decoder = build_decoder(read_checkpoint(model_dir("qwen2")))
    stamped = export_onnx(decoder, layer_template=True, write_layer=False)
    full = export_onnx(decoder, layer_template=False, write_layer=False)
    assert stamped.meta["edgec.trace"] == "one layer" and full.meta["edgec.trace"] == "every layer"
    assert [v.name for v in stamped.graph.inputs] == [v.name for v in full.graph.inputs]
    assert [v.name for v in stamped.graph.outputs] == [v.name for v in full.graph.outputs]
    feeds = decoder_feeds(decoder, batch=2)
    for a, b in zip(run(full, feeds), run(stamped, feeds)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    scopes = {n.metadata_props.get("pkg.torch.onnx.name_scopes", "") for n in stamped.graph if n.op_type == "MatMul"}
    assert any("model.layers.1.mlp.down_proj" in s for s in scopes)  # per-layer overrides still see layer paths


def test_layer_template_gives_each_layer_its_own_norms_when_layer_0s_are_equal(model_dir, caplog):
    """The exporter gives equal initializers one value: with layer 0's two norms equal, the trace has one
    weight for both, which stamping must not hand to every layer's two norms."""
    decoder = build_decoder(read_checkpoint(model_dir("llama")))
    layers = decoder.model.layers
    with torch.no_grad():
        shared = torch.linspace(0.5, 1.5, decoder.cfg.hidden_size)
        layers[0].input_layernorm.weight.copy_(shared)
        layers[0].post_attention_layernorm.weight.copy_(shared)
        for layer in layers[1:]:
            layer.input_layernorm.weight.copy_(shared.flip(0))
            layer.post_attention_layernorm.weight.copy_(shared * 0.25)
    with caplog.at_level("WARNING", logger="edgec"):
        traced = export_onnx(decoder, layer_template=True, write_layer=False)
    assert traced.meta["edgec.trace"] == "every layer"  # the one-layer template refused, for this reason:
    assert "equal in layer 0, not in layer 1" in caplog.text
    written = export_onnx(decoder, layer_template=True, write_layer=True)  # no initializer shared: stamped
    assert written.meta["edgec.trace"] == "one layer, written"
    feeds = decoder_feeds(decoder)
    with torch.no_grad():
        expected = decoder(*(torch.from_numpy(array) for array in feeds.values()))  # ids, mask, positions, past
    for model in (traced, written):
        np.testing.assert_allclose(run(model, feeds)[0], expected[0].numpy(), atol=1e-5)
