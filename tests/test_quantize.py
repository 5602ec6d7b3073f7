"""Weight quantization: packing checked against onnxruntime's own kernels, the pass on a traced decoder,
overrides, and an int4 build against the fp32 reference gates."""

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from compiler.cli import main
from compiler.config import QuantConfig
from compiler.errors import UsageError
from compiler.frontend.load import build_decoder, read_checkpoint
from compiler.onnx.export import export_onnx
from compiler.onnx.passes import build_pipeline, op_counts, run_passes
from compiler.quant.blocks import dequantize_blocks, pack, quantize_blocks


def single_node_model(op, inputs, initializers, attributes):
    node = ir.node(op, [*inputs, *initializers] if op == "MatMulNBits" else [initializers[0], *inputs, *initializers[1:]],
                   attributes=attributes, domain="com.microsoft")
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph(inputs, node.outputs, nodes=[node], initializers=initializers,
                     opset_imports={"": 20, "com.microsoft": 1})
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_packing_matches_onnxruntime_kernels(bits, symmetric):
    rng = np.random.default_rng(0)
    k, n, block = 96, 40, 32
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, scales, zeros = quantize_blocks(w, bits, block, symmetric, "rtn")
    deq = dequantize_blocks(q, scales, zeros, k)
    assert np.abs(deq - w).max() < (0.35 if bits == 4 else 0.02)
    zp = [] if symmetric else [ir.Value(name="zp", const_value=ir.tensor(pack(zeros, bits)))]
    scale_value = ir.Value(name="scales", const_value=ir.tensor(scales))

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3, k]))
    weights = ir.Value(name="w", const_value=ir.tensor(pack(q, bits)))
    session = single_node_model("MatMulNBits", [x], [weights, scale_value, *zp],
                                {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 0})
    xs = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": xs})[0], xs @ deq.T, atol=1e-4)

    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([3]))
    table = ir.Value(name="t", const_value=ir.tensor(pack(q, bits).reshape(n, -1)))
    scale_value2 = ir.Value(name="scales", const_value=ir.tensor(scales))
    zp2 = [] if symmetric else [ir.Value(name="zp", const_value=ir.tensor(pack(zeros, bits)))]
    session = single_node_model("GatherBlockQuantized", [ids], [table, scale_value2, *zp2],
                                {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits})
    np.testing.assert_array_equal(session.run(None, {"ids": np.array([0, 5, 39])})[0], deq[[0, 5, 39]])


def test_clip_search_lowers_weight_error_where_outliers_stretch_blocks():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    w[rng.random(w.shape) < 0.01] *= 8  # a few outliers per block, as trained weights have
    errors = {}
    for algo in ("rtn", "clip"):
        q, s, z = quantize_blocks(w, 4, 32, True, algo)
        errors[algo] = float(((dequantize_blocks(q, s, z, 128) - w) ** 2).mean())
    assert errors["clip"] < 0.97 * errors["rtn"]


@pytest.fixture(scope="module")
def traced_trained(trained_dir):
    decoder = build_decoder(read_checkpoint(trained_dir))
    return decoder, ir.to_proto(export_onnx(decoder))


def quantized(traced, config):
    decoder, proto = traced
    model, records = run_passes(ir.from_proto(proto), build_pipeline("fuse+int4", decoder.cfg, config))
    return decoder, model, records[-1]["rewrites"]


def logits(model, decoder, ids):
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    cfg = decoder.cfg
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
    return session.run(["logits"], feeds)[0]


def test_int4_pass_quantizes_every_projection_embedding_and_head(traced_trained):
    decoder, model, counts = quantized(traced_trained, QuantConfig())
    layers = decoder.cfg.num_layers
    # q/k/v are packed into one projection per layer before quantization.
    assert counts["matmul_int4"] == 5 * layers and counts["lm_head_int4"] == 1 and counts["embedding_int4"] == 1
    assert counts["lm_head_shares_embedding_table"] == 1  # tied: one int4 table on disk
    ops = op_counts(model)
    assert ops["MatMulNBits"] == 5 * layers + 1 and ops["GatherBlockQuantized"] == 1 and "MatMul" not in ops
    assert counts["weight_mb_after"] < counts["weight_mb_before"] / 4
    ids = np.array([[1, 40, 41, 42, 50, 60, 70, 80]])
    fp32 = logits(ir.from_proto(traced_trained[1]), decoder, ids)

    def sqnr(q):
        return 10 * np.log10((fp32**2).sum() / ((fp32 - q) ** 2).sum())

    int4 = sqnr(logits(model, decoder, ids))
    _, model8, _ = quantized(traced_trained, QuantConfig(keep_int8=(".",), embedding_bits=8, lm_head_bits=8))
    int8 = sqnr(logits(model8, decoder, ids))
    assert int4 > 8 and int8 > int4 + 15, (int4, int8)


def test_int4_pass_reads_the_parameters_rows_without_transposing_them(traced_trained, monkeypatch):
    """The exported graph's MatMul weights are the parameters' lazy transposes (passes/base.TransposedRows):
    q/k/v packing and int4 quantization read the parameters' own rows, and nothing makes a transposed copy
    except to write a weight kept in fp32. The result is the same bytes as from materialized weights."""
    import compiler.onnx.passes.base as base

    decoder, proto = traced_trained
    transposed = []
    real = base._transposed
    monkeypatch.setattr(base, "_transposed", lambda rows: transposed.append(rows.shape) or real(rows))
    last = f"model.layers.{decoder.cfg.num_layers - 1}.mlp.down_proj"  # a stamped layer's (layer 0: the trace's)
    for keep, expected in (((), 0), ((last,), 1)):
        transposed.clear()
        config = QuantConfig(keep_fp32=keep)
        lazy, _ = run_passes(export_onnx(decoder), build_pipeline("fuse+int4", decoder.cfg, config))
        written = ir.from_proto(ir.to_proto(lazy))
        assert len(transposed) == expected, transposed
        _, materialized, _ = quantized(traced_trained, config)
        weights = [{v.name: v.const_value.numpy() for v in model.graph.initializers.values() if ".weight" in v.name}
                   for model in (written, materialized)]  # (the exporter's names for
        assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 5 * decoder.cfg.num_layers  # others vary)
        assert all(np.array_equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_per_layer_overrides(traced_trained):
    config = QuantConfig(keep_fp32=(r"layers\.0\.self_attn",), keep_int8=(r"layers\.1\.mlp",), lm_head_bits=8,
                         embedding_bits=0)
    decoder, model, counts = quantized(traced_trained, config)
    assert counts["matmul_kept_fp32"] == 2 and counts["matmul_int8"] == 3 and counts["matmul_int4"] == 5
    assert counts["lm_head_int8"] == 1 and counts["embedding_kept_fp32"] == 1
    bits = sorted(n.attributes.get_int("bits") for n in model.graph if n.op_type == "MatMulNBits")
    assert bits == [4] * 5 + [8] * 4
    assert op_counts(model)["MatMul"] == 2 and "GatherBlockQuantized" not in op_counts(model)


def test_bad_quant_settings_are_usage_errors():
    for kwargs, fragment in [({"block_size": 48}, "--block-size 48"), ({"algo": "gptq9"}, "--algo gptq9"),
                             ({"keep_fp32": ("(",)}, "not a valid regex")]:
        with pytest.raises(UsageError, match=fragment.replace("(", r"\(")):
            QuantConfig(**kwargs)
    result = CliRunner().invoke(main, ["build", "--model", "M", "--out", "O", "--quant", "int4", "--block-size", "48"])
    assert result.exit_code == 2 and "--block-size 48" in result.stderr


def test_int4_build_passes_its_gates_and_runs_in_onnxruntime_genai(trained_dir, tmp_path):
    out = tmp_path / "int4"
    result = CliRunner().invoke(main, ["build", "--model", str(trained_dir), "--out", str(out), "--quant", "int4",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"][0]["precision"] == "int4" and manifest["artifacts"][0]["pipeline"] == "fuse+int4"
    quant = manifest["artifacts"][0]["quant"]
    assert quant["block_size"] == 32 and quant["algo"] == "gptq" and quant["calibration"] is None  # the defaults
    assert {g["metric"] for g in manifest["validation"]["gates"]} == {"kl_mean", "top1_agreement", "perplexity_ratio"}
    assert manifest["validation"]["metrics"]["perplexity_artifact"] > 1
    pytest.importorskip("onnxruntime_genai")
    from runtimes.genai import GenaiRuntime

    assert len(GenaiRuntime(out).generate([1, 40, 41, 42], 8)) >= 1


def test_default_int4_without_a_tokenizer_says_how_to_go_on(tmp_path):
    from compiler.tiny_models import make_model

    model = tmp_path / "model"
    make_model(model, tokenizer=False)
    out = tmp_path / "int4"
    result = CliRunner().invoke(main, ["build", "--model", str(model), "--out", str(out), "--quant", "int4", "--quiet"])
    assert result.exit_code == 2 and not out.exists(), result.output
    assert "needs tokenizer.json" in result.output and "--algo rtn" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    rtn = CliRunner().invoke(main, ["build", "--model", str(model), "--out", str(out), "--quant", "int4", "--algo", "rtn",
                                    "--no-validate", "--quiet"])
    assert rtn.exit_code == 0, rtn.output


def test_lora_retention_measures_how_much_of_the_adapter_change_survives():
    from compiler.validate import lora_retention

    rng = np.random.default_rng(0)
    base = [rng.standard_normal((5, 7))]
    delta_a, delta_b = [rng.standard_normal((5, 7))], [rng.standard_normal((5, 7))]
    merged = [base[0] + delta_a[0] + delta_b[0]]
    reference = {"base": base, "merged": merged,
                 "adapters": [{"path": "a", "delta": delta_a}, {"path": "b", "delta": delta_b}]}
    assert lora_retention(merged, reference)["total"] == pytest.approx(1.0)
    assert lora_retention(base, reference)["total"] == pytest.approx(0.0, abs=1e-12)
    half = lora_retention([base[0] + 0.5 * (merged[0] - base[0])], reference)
    assert half["total"] == pytest.approx(0.5) and half["rel_error"] == pytest.approx(0.5)
    only_a = lora_retention([base[0] + delta_a[0]], reference)["per_adapter"]
    assert only_a[0]["retention"] == pytest.approx(1.0, abs=0.3) and abs(only_a[1]["retention"]) < 0.3


def test_int4_build_reports_lora_delta_retention_per_adapter(trained_dir, tmp_path):
    from compiler.tiny_models import make_adapter

    first = make_adapter(trained_dir, tmp_path / "a", target_modules=["q_proj", "v_proj"], r=4, alpha=32, seed=3)
    second = make_adapter(trained_dir, tmp_path / "b", target_modules=["down_proj"], r=4, alpha=32, seed=4)
    out = tmp_path / "int4"
    result = CliRunner().invoke(main, ["build", "--model", str(trained_dir), "--adapter", str(first), "--adapter",
                                       str(second), "--out", str(out), "--quant", "int4", "--block-size", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    retention = json.loads((out / "manifest.json").read_text())["validation"]["lora_retention"]
    assert [a["path"] for a in retention["per_adapter"]] == [str(first), str(second)]
    assert 0.7 < retention["total"] < 1.3 and 0 < retention["rel_error"] < 1


def test_chunked_quantization_equals_whole_matrix(monkeypatch):
    """Row chunks in threads (matrices from PARALLEL_FROM weights) give the whole matrix's codes exactly:
    each row's arithmetic is elementwise, the same in any chunk."""
    import compiler.quant.blocks as qw

    w = np.random.default_rng(2).standard_normal((50, 64)).astype(np.float32)
    whole = qw.quantize_blocks(w, 4, 32, False, "clip")
    monkeypatch.setattr(qw, "ROWS_PER_CHUNK", 16)
    monkeypatch.setattr(qw, "PARALLEL_FROM", 0)
    monkeypatch.setattr(qw.os, "cpu_count", lambda: 3)
    for a, b in zip(whole, qw.quantize_blocks(w, 4, 32, False, "clip")):
        np.testing.assert_array_equal(a, b)


def reference_block_scales(blocks: np.ndarray, bits: int, symmetric: bool, grid: str):
    """The grids' rules written out per block in numpy, blocks [N, nb, bs]: onnx symmetric maps the signed
    absolute maximum (the first in order, as MLAS scans) to -2^(bits-1); xnnpack takes the smallest positive
    scale covering [min, max] with codes -2^(bits-1)..2^(bits-1)-1, rounded up to bfloat16; asymmetric
    spans [min(min, 0), max(max, 0)] with a rounded zero point."""
    half = 2 ** (bits - 1)
    if grid == "xnnpack":
        scale = np.maximum(-np.minimum(blocks.min(-1), 0) / half, np.maximum(blocks.max(-1), 0) / (half - 1))
        raw = np.ascontiguousarray(scale, np.float32).view(np.uint32)
        up = np.where((raw & 0xFFFF) != 0, np.uint32(0x10000), np.uint32(0))
        scale = ((raw & np.uint32(0xFFFF0000)) + up).view(np.float32) + np.float32(0)
        return scale, np.full(scale.shape, half, np.float32)
    if symmetric:
        first = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        return (first / -half).astype(np.float32), np.full(first.shape, half, np.float32)
    lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    scale = (hi - lo) / (2**bits - 1)
    return scale, np.clip(np.round(-lo / np.where(scale == 0, 1, scale)), 0, 2**bits - 1)


@pytest.mark.parametrize("grid,symmetric", [("onnx", True), ("onnx", False), ("xnnpack", True)])
def test_block_scales_follow_each_grids_rule(grid, symmetric):
    """Block scales from min/max reductions, along the last dim (quantize_blocks) or dim 1 (GPTQ's column
    blocks), are the grid's rule bit for bit: all-zero and all-negative blocks, and blocks whose largest
    magnitude is both +m and -m, either first."""
    import torch

    from compiler.quant.blocks import block_scales_and_zeros

    blocks = torch.from_numpy(np.random.default_rng(7).standard_normal((4, 32, 60)).astype(np.float32))
    blocks[0, :, :5] = 0
    blocks[1, :, 5] = -blocks[1, :, 5].abs()
    blocks[2, 3, :], blocks[2, 9, :] = 4.0, -4.0
    blocks[3, 2, :], blocks[3, 20, :] = -4.0, 4.0
    # A few blocks alone too: torch's elementwise kernels take another (non-vector) path for them.
    for blocks in (blocks, torch.zeros(1, 32, 3)):
        last = blocks.transpose(1, 2).contiguous()
        scale, zero = reference_block_scales(last.numpy(), 4, symmetric, grid)
        for got_scale, got_zero in (block_scales_and_zeros(blocks, 4, symmetric, grid=grid, dim=1),
                                    block_scales_and_zeros(last, 4, symmetric, grid=grid)):
            np.testing.assert_array_equal(scale.view(np.uint32), got_scale.numpy().view(np.uint32))  # -0.0 too
            np.testing.assert_array_equal(zero.astype(np.uint8), got_zero.numpy().astype(np.uint8))


def test_torch_rtn_equals_the_rtn_path():
    """The smoothing check's round-to-nearest (torch) gives quantize_blocks' rtn codes dequantized, a K that
    is no multiple of the block included."""
    import torch

    from compiler.quant.blocks import rtn_dequantized

    w = np.random.default_rng(8).standard_normal((40, 100)).astype(np.float32)
    w[3, :32] = 0
    expected = dequantize_blocks(*quantize_blocks(w, 4, 32, True, "rtn"), 100)
    np.testing.assert_array_equal(expected, rtn_dequantized(torch.from_numpy(w), 4, 32).numpy())


def assert_same_quantization(a, b, name=""):
    """Two schedules of one quantization (row jobs, batches, windows) agree as far as any CPU guarantees.

    Not bit for bit: BLAS picks its kernels and reduction order per CPU and per matrix shape, so a batched
    or row-cut schedule may differ from the whole-matrix one in the last bit of a scale, and such a
    difference may flip a rounding tie in a code (see tests/conftest.py)."""
    (q_a, s_a, z_a), (q_b, s_b, z_b) = a, b
    assert q_a.shape == q_b.shape and (q_a != q_b).mean() < 1e-2, name
    np.testing.assert_allclose(s_a, s_b, rtol=1e-5, err_msg=name)
    assert (z_a != z_b).mean() < 1e-2, name


def test_gptq_lowers_output_error_on_its_calibration_inputs():
    import torch

    from compiler.quant.gptq import gptq_quantize

    rng = np.random.default_rng(3)
    # Correlated inputs with uneven scales, as activations have; that is where GPTQ beats RTN.
    mix = rng.standard_normal((64, 64)).astype(np.float32) * np.linspace(0.1, 3, 64, dtype=np.float32)
    x = rng.standard_normal((512, 64)).astype(np.float32) @ mix
    w = rng.standard_normal((48, 64)).astype(np.float32)
    hessian = torch.from_numpy(2 * x.T @ x / len(x))
    errors = {}
    for algo in ("rtn", "gptq"):
        if algo == "gptq":
            q, s, z = gptq_quantize(torch.from_numpy(w), hessian, 4, 32, True)
        else:
            q, s, z = quantize_blocks(w, 4, 32, True, "rtn")
        deq = dequantize_blocks(q, s, z, 64)
        errors[algo] = float(((x @ deq.T - x @ w.T) ** 2).mean())
    assert errors["gptq"] < 0.85 * errors["rtn"], errors


def textbook_gptq(w, hessian, bits, block, symmetric, damp=0.01):
    """GPTQ as Frantar et al. write it, one column at a time, from the upper Cholesky factor of H^-1."""
    import torch

    from compiler.quant.blocks import block_scales_and_zeros

    w, h = w.double().clone(), hessian.double().clone()
    n, k = w.shape
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all, scales, zeros = np.zeros((n, k), np.uint8), [], []
    for col in range(k):
        if col % block == 0:
            scale, zero = block_scales_and_zeros(w[:, col : col + block][:, None].float(), bits, symmetric)
            scale, zero = scale[:, 0].double(), zero[:, 0].double()
            scales.append(scale.numpy())
            zeros.append(zero.numpy())
        q = torch.clamp(torch.round(w[:, col] / scale) + zero, 0, 2**bits - 1)
        q_all[:, col] = q.numpy()
        err = (w[:, col] - (q - zero) * scale) / u[col, col]
        w[:, col + 1 :] -= err[:, None] * u[col, col + 1 :][None]
    return q_all.reshape(n, k // block, block), np.stack(scales, 1), np.stack(zeros, 1)


def test_gptq_zeroes_the_weights_of_inputs_that_are_never_active():
    """An input channel that is always 0 on calibration text (H_ii = 0) has its weights rounded to 0: they
    cannot change the output there, and GPTQ has no Hessian to spread their error with."""
    import torch

    from compiler.quant.gptq import gptq_quantize

    rng = np.random.default_rng(4)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    x[:, 5] = 0
    w = torch.from_numpy(rng.standard_normal((24, 64)).astype(np.float32))
    q, scales, zeros = gptq_quantize(w, torch.from_numpy(2 * x.T @ x / len(x)), 4, 32, True)
    deq = dequantize_blocks(q, scales, zeros, 64)
    assert np.all(deq[:, 5] == 0) and np.count_nonzero(deq[:, 6]) > 12


@pytest.fixture
def calibration_bf16(monkeypatch):
    """Sets EDGEC_CALIBRATION_BF16 for the test (cpu_linalg.use_bf16 is cached: cleared before and after)."""
    from compiler.quant import cpu_linalg

    def choose(on: bool) -> bool:
        monkeypatch.setenv("EDGEC_CALIBRATION_BF16", "1" if on else "0")
        cpu_linalg.use_bf16.cache_clear()
        return cpu_linalg.use_bf16()

    yield choose
    cpu_linalg.use_bf16.cache_clear()


def correlated_hessian(k: int, seed: int = 5):
    """x and H = 2 x^T x / n of inputs with correlated channels of uneven scales, as activations have."""
    import torch

    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * np.linspace(0.1, 3, k)
    x = rng.standard_normal((400, k)) @ mix
    return x, torch.from_numpy((2 * x.T @ x / len(x)).astype(np.float32))


@pytest.mark.parametrize(("block", "k"), [(16, 128), (32, 128), (64, 128), (16, 320), (32, 320), (64, 384),
                                          (128, 384), (256, 512)])
def test_gptq_equals_the_textbook_algorithm(block, k, calibration_bf16):
    """The column loop rounds from Cholesky factors of H, not of H^-1, in lazy windows and groups of
    windows (past 128 columns): the same result, with its products in fp32."""
    import torch

    from compiler.quant.gptq import gptq_quantize

    calibration_bf16(False)
    _, hessian = correlated_hessian(k)
    w = torch.from_numpy(np.random.default_rng(6).standard_normal((40, k)).astype(np.float32))
    ours = gptq_quantize(w, hessian, 4, block, False)
    textbook = textbook_gptq(w, hessian, 4, block, False)
    assert (ours[0] != textbook[0]).mean() < 2e-3
    np.testing.assert_allclose(ours[1], textbook[1], rtol=1e-4)
    assert (ours[2] != textbook[2]).mean() < 2e-3


def test_gptq_with_bf16_error_sums_is_as_good_as_the_textbook(calibration_bf16):
    """With the groups' error sums in bf16 (cpu_linalg.use_bf16), codes near a rounding boundary may go the
    other way, but the output error on the calibration inputs stays the textbook's."""
    import torch

    from compiler.quant.gptq import gptq_quantize

    if not calibration_bf16(True):
        pytest.skip("this torch build has no oneDNN bf16 products")
    k = 768  # six groups of 128 columns
    x, hessian = correlated_hessian(k)
    w = torch.from_numpy(np.random.default_rng(6).standard_normal((64, k)).astype(np.float32))
    ours = gptq_quantize(w, hessian, 4, 32, True)
    textbook = textbook_gptq(w, hessian, 4, 32, True)
    rtn = quantize_blocks(w.numpy(), 4, 32, True, "rtn")
    error = {name: float(((x @ (dequantize_blocks(*codes, k) - w.numpy()).T) ** 2).mean())
             for name, codes in (("bf16", ours), ("textbook", textbook), ("rtn", rtn))}
    assert abs(error["bf16"] / error["textbook"] - 1) < 0.01 and error["textbook"] < 0.8 * error["rtn"], error
    assert 0 < (ours[0] != textbook[0]).mean() < 0.05  # bf16 did change some codes: it ran


def test_window_kernel_rounds_each_column_from_the_errors_before_it():
    """The compiled window (compiler/quant/gptq_window.py) against the loop written out in numpy: codes,
    errors w - (q - zero) * scale, the codes stored by rows, and the bf16 history rounded as torch rounds."""
    import torch

    from compiler.quant.gptq_window import round_window

    rng = np.random.default_rng(8)
    b, k, n, o1, i1, i2 = 2, 96, 40, 32, 48, 80  # a window in the middle of a group
    w = rng.standard_normal((b, k, n)).astype(np.float32)
    shift = (0.1 * rng.standard_normal((b, 64, n))).astype(np.float32)
    feedback = (0.3 * rng.standard_normal((1, k, k))).astype(np.float32)
    scale = rng.uniform(0.2, 0.5, (b, n)).astype(np.float32)
    zero = np.full((b, n), 8, np.float32)
    q_rows = np.zeros((b, n, k), np.uint8)
    errors = np.zeros((b, 64, n), np.float32)
    history = np.zeros((b, k, n), np.uint16)
    round_window(w, shift, feedback, np.zeros(b, np.int64), i1, i2, o1, scale, zero, 1 / scale, zero * scale,
                 np.float32(15), q_rows, errors, history, np.empty((0, 0, 0), np.float32))
    start = w[:, i1:i2] + shift[:, i1 - o1 : i2 - o1]
    for i in range(i2 - i1):  # the same float32 operations in the same order: equal to the bit
        q = np.clip(np.rint(start[:, i] * (1 / scale)) + zero, 0, 15)
        np.testing.assert_array_equal(q_rows[:, :, i1 + i], q.astype(np.uint8))
        error = (w[:, i1 + i] + zero * scale) - q * scale
        np.testing.assert_array_equal(errors[:, i1 - o1 + i], error)
        start[:, i + 1 :] += feedback[0, i1 + i, i1 + i + 1 : i2, None] * error[:, None]
    assert not q_rows[:, :, :i1].any() and not q_rows[:, :, i2:].any()
    bf16 = torch.from_numpy(errors[:, i1 - o1 : i2 - o1]).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(history[:, i1:i2], bf16)


def test_gptq_batch_sharing_a_factor_equals_a_factor_per_matrix():
    """Row jobs of one matrix share its factor (passed once, not stacked per job): the same codes."""
    import torch

    from compiler.quant.gptq import _error_feedback_factor, _gptq_columns

    k = 256
    factors = [_error_feedback_factor(correlated_hessian(k, seed)[1], k, 0.01)[0] for seed in (5, 7)]
    w = torch.from_numpy(np.random.default_rng(9).standard_normal((3, k, 48)).astype(np.float32))
    shared = _gptq_columns(w.clone(), torch.stack(factors), 4, 32, True, factor_of=[0, 0, 1])
    stacked = _gptq_columns(w.clone(), torch.stack([factors[0], factors[0], factors[1]]), 4, 32, True)
    for a, b in zip(shared, stacked):
        np.testing.assert_array_equal(a, b)


def test_gptq_build_calibrates_every_projection(trained_dir, tmp_path):
    from compiler.quant.gptq import BUILTIN_CALIBRATION

    # Varied text, as a user's should be: one sentence repeated (tried first) calibrates GPTQ and the
    # channel smoothing to a dozen tokens, and the build then fails its gates on other prompts.
    text = BUILTIN_CALIBRATION.read_text()
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(text[len(text) // 2 :])
    out = tmp_path / "gptq"
    result = CliRunner().invoke(main, ["build", "--model", str(trained_dir), "--out", str(out), "--quant", "int4",
                                       "--algo", "gptq", "--calibration", str(calibration), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    quantize = next(p for p in report["passes"] if p["pass"] == "QuantizeWeightsPass")
    assert quantize["rewrites"]["calibrated"] == 5 * 2 + 1  # packed qkv, o, gate, up, down per layer; lm_head
    assert "calibrate_gptq" in [s["stage"] for s in report["stages"]]
    smoothing = report["smoothing"]
    assert smoothing["alpha"] == 0.5 and smoothing["fold_points"] == 4 * 2  # q/k/v, gate/up, down, o per layer
    assert sum(smoothing["by_input"].values()) == smoothing["smoothed"] <= smoothing["fold_points"]
    assert sum(smoothing["considered_by_input"].values()) == smoothing["fold_points"]
    assert all(smoothing["by_input"][kind] <= n for kind, n in smoothing["considered_by_input"].items())
    assert f"{smoothing['smoothed']} of 8 fold points smoothed" in (out / "report.md").read_text()
    missing = CliRunner().invoke(main, ["build", "--model", str(trained_dir), "--out", str(tmp_path / "x"),
                                        "--quant", "int4", "--algo", "gptq", "--calibration", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2 and "nope.txt" in missing.stderr


def test_narrow_calibration_text_is_warned_about(trained_dir, tmp_path):
    calibration = tmp_path / "one-sentence.txt"
    calibration.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "narrow"
    result = CliRunner().invoke(main, ["build", "--model", str(trained_dir), "--out", str(out), "--quant", "int4",
                                       "--calibration", str(calibration), "--no-validate", "--quiet"])
    assert result.exit_code == 0, result.output
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    assert any("one-sentence.txt: only" in w and "distinct tokens" in w for w in warnings), warnings


def test_hidden_size_not_a_multiple_of_the_block(traced_trained):
    """hidden 128, block 256: projections pad their last block; the tied table uses block 128 and is shared."""
    decoder, model, counts = quantized(traced_trained, QuantConfig(block_size=256))
    assert counts["lm_head_shares_embedding_table"] == 1 and counts["shared_table_block_128"] == 1
    ids = np.array([[1, 40, 41, 42]])
    fp32 = logits(ir.from_proto(traced_trained[1]), decoder, ids)
    q = logits(model, decoder, ids)
    assert q.shape == fp32.shape and 10 * np.log10((fp32**2).sum() / ((fp32 - q) ** 2).sum()) > 8
    unshared = QuantConfig(block_size=256, embedding_bits=8)  # different bits: two tables, padding dropped
    _, model2, counts2 = quantized(traced_trained, unshared)
    assert "lm_head_shares_embedding_table" not in counts2
    assert logits(model2, decoder, ids).shape == fp32.shape


def test_gptq_in_batched_row_jobs_equals_whole_matrix(monkeypatch):
    import torch

    import compiler.quant.gptq as gptq

    rng = np.random.default_rng(4)
    x = rng.standard_normal((256, 40)).astype(np.float32)
    hessian = torch.from_numpy(2 * x.T @ x / len(x))
    w = torch.from_numpy(rng.standard_normal((24, 40)).astype(np.float32))  # K=40: one padded block of 32
    whole = gptq.gptq_quantize(w, hessian, 4, 32, True)
    monkeypatch.setattr(gptq, "ROWS_PER_JOB", 7)  # three jobs of 7 rows in one batch, one of 3 alone
    jobs = gptq.gptq_quantize(w, hessian, 4, 32, True)
    assert_same_quantization(whole, jobs)
    for result in (whole, jobs):
        assert result[0].shape == (24, 2, 32) and (result[0][:, 1, 8:] == 8).all()  # padding quantizes to zero


def test_gptq_batched_across_layers_equals_one_matrix_at_a_time(trained_dir, monkeypatch):
    """Windows of layers and batches of equal-shape matrices are a schedule, not a change of result."""
    import compiler.quant.gptq as gptq
    from compiler.frontend.load import build_decoder, read_checkpoint

    model = build_decoder(read_checkpoint(trained_dir))
    sequences = [[(7 * i + j) % 200 + 3 for j in range(32)] for i in range(3)]
    batched = gptq.gptq_blocks(model, sequences, 4, 32, True)
    monkeypatch.setattr(gptq, "HESSIAN_BUDGET_BYTES", 1)  # one layer per window
    monkeypatch.setattr(gptq, "BATCH_ELEMENTS", 1)  # one matrix per column loop
    single = gptq.gptq_blocks(model, sequences, 4, 32, True)
    assert batched.keys() == single.keys() and len(batched) == 7 * model.cfg.num_layers + 1
    for name in batched:
        assert_same_quantization(batched[name], single[name], name)


def test_default_int4_builds_are_byte_identical(trained_dir, tmp_path):
    """GPTQ's Hessians, factors and batched column loop, and the written one-layer graph
    (compiler/onnx/layer_graph.py), give the same bytes build after build."""
    import hashlib

    digests, traces = [], []
    for name in ("a", "b"):
        result = CliRunner().invoke(main, ["build", "--model", str(trained_dir), "--out", str(tmp_path / name),
                                           "--quant", "int4", "--quiet", "--no-validate"])
        assert result.exit_code == 0, result.output
        digests.append([hashlib.sha256((tmp_path / name / f).read_bytes()).hexdigest()
                        for f in ("model.onnx", "model.onnx.data")])
        traces.append(json.loads((tmp_path / name / "report.json").read_text())["export"]["trace"])
    assert traces == ["one layer, written"] * 2
    assert digests[0] == digests[1]


@pytest.mark.parametrize("library", ["mkl", "onednn"])
def test_calibration_products_on_either_cpu_library(library, monkeypatch):
    """Calibration's fp32 products and Cholesky factors (compiler/quant/cpu_linalg.py) through MKL or oneDNN,
    whichever the processor's vendor picks: both give x^T x, linears and factors to fp32 precision, for any
    strides (a column slice, which oneDNN takes only made contiguous), and the same bits call after call."""
    import torch

    from compiler.quant import cpu_linalg
    from compiler.quant.cpu_linalg import gram

    monkeypatch.setenv("EDGEC_FP32_MATMUL", library)
    cpu_linalg.use_onednn.cache_clear()
    try:
        if library == "onednn" and not cpu_linalg.use_onednn():
            pytest.skip("this torch build has no oneDNN linear")
        assert cpu_linalg.use_onednn() == (library == "onednn")
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(300, 1100, generator=generator)
        for k in (200, 1100):  # one product, and the blocked lower triangle
            exact = x[:, :k].double().T @ x[:, :k].double()
            product = gram(x[:, :k])
            assert torch.equal(product, gram(x[:, :k]))
            torch.testing.assert_close(product.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
        weight, bias = torch.randn(70, 500, generator=generator), torch.randn(70, generator=generator)
        for inputs in (x[:, :500], x[:, 100:600].T.contiguous().T, x[None, :, 600:]):
            with cpu_linalg.fast_linears():
                out = torch.nn.functional.linear(inputs, weight=weight, bias=bias)
            exact = inputs.double() @ weight.double().T + bias.double()
            torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
            if library == "onednn":  # the mode rerouted it, not MKL within tolerance (the same call, same layout)
                direct = torch.ops.mkldnn._linear_pointwise(cpu_linalg._dense(inputs), weight, bias, "none", [], "")
                assert torch.equal(out, direct)
        with torch.enable_grad():  # a product that needs gradients stays torch's own
            trained = weight.clone().requires_grad_()
            with cpu_linalg.fast_linears():
                torch.nn.functional.linear(x[:, :500], trained).sum().backward()
            assert trained.grad is not None
        for k in (300, 1100):  # MKL's potrf, and the blocked factor through this library's products
            hessian = gram(x[:, :k]) / 300 + 0.01 * torch.eye(k)
            exact = torch.linalg.cholesky(hessian.double().flip(0, 1)).flip(0, 1)  # upper: H = R R^T
            factor = cpu_linalg.reverse_cholesky(hessian.clone())
            assert torch.equal(factor, factor.triu())
            torch.testing.assert_close(factor.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
    finally:
        cpu_linalg.use_onednn.cache_clear()


def test_bf16_linear_rounds_its_operands_and_result_only(calibration_bf16):
    """linear_bf16 (GPTQ's error sums, the smoothing check): the product of the operands rounded to bf16,
    summed in fp32 and rounded once more; torch's fp32 product where gradients are needed or the processor
    has no bf16 products."""
    import torch

    from compiler.quant import cpu_linalg

    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(64, 300, generator=generator), torch.randn(40, 300, generator=generator)
    rounded = x.bfloat16().double() @ weight.bfloat16().double().T
    exact = x.double() @ weight.double().T
    if calibration_bf16(True):
        out = cpu_linalg.linear_bf16(x, weight)
        assert out.dtype == torch.float32 and torch.equal(out, cpu_linalg.linear_bf16(x, weight))
        # Either layout of the weight, and a weight already in bf16 (their sums may run in another order).
        others = (cpu_linalg.linear_bf16(x, weight.T.contiguous().T), cpu_linalg.linear_bf16(x, weight.bfloat16()))
        for product in (out, *others):
            torch.testing.assert_close(product.double(), rounded, rtol=2**-8, atol=2**-8 * float(rounded.abs().max()))
        assert float((out.double() - exact).abs().max()) > 1e-4 * float(exact.abs().max())  # not fp32's result
        with torch.enable_grad():
            trained = weight.clone().requires_grad_()
            cpu_linalg.linear_bf16(x, trained).sum().backward()
            torch.testing.assert_close(trained.grad, x.sum(0).expand_as(weight))
    assert not calibration_bf16(False)
    out = cpu_linalg.linear_bf16(x, weight)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))


def test_absolute_max_equals_abs_then_amax():
    """blocks.absolute_max (GPTQ's activation maxima, the smoothing's weight maxima) gives what
    x.abs().amax(dim) gives, all-zero and negative-zero slices included."""
    import torch

    from compiler.quant.blocks import absolute_max

    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    x[:, 3] = 0.0
    x[:, 5] = -0.0
    x[:, 7] = -x[:, 7].abs()
    for dim in (0, 1):
        assert torch.equal(absolute_max(x, dim), x.abs().amax(dim))
    assert not torch.signbit(absolute_max(x, 0)).any()
