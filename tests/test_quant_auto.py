"""--quant auto: per-module sensitivity, a plan that meets a KL target on calibration text, both formats honour it."""

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner

from compiler.cli import main
from compiler.config import QuantConfig
from compiler.frontend.load import build_decoder, read_checkpoint
from compiler.onnx.scopes import module_path
from compiler.quant import auto
from compiler.quant.gptq import calibration_sequences
from compiler.quant.sensitivity import Probe, mixed_kl, quantized_weights, sensitivities, units
from tests.test_bad_input import assert_one_line_error

MAX_KL = 0.004  # about half of what all-int4 block 128 gives the fitted model: the plan must mix


@pytest.fixture(scope="module")
def auto_bundle(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "b"
    result = CliRunner().invoke(main, ["build", "--model", str(trained_dir), "--out", str(out), "--quant", "auto",
                                       "--max-kl", str(MAX_KL), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def test_auto_plan_meets_its_kl_target_in_onnxruntime(trained_dir, auto_bundle):
    from runtimes.registry import open_runtime

    manifest = json.loads((auto_bundle / "manifest.json").read_text())
    quant = manifest["build_config"]["export"]["quant"]
    plan = {path: (bits, block) for path, bits, block in quant["plan"]}
    assert quant["max_kl"] == MAX_KL and len(set(plan.values())) > 1, plan  # a mix, not one scheme
    report = json.loads((auto_bundle / "report.json").read_text())["quant_auto"]
    assert report["met"] and report["most_sensitive"][0]["module"] in plan
    smoothing = json.loads((auto_bundle / "report.json").read_text())["smoothing"]  # from the plan's GPTQ pass
    assert smoothing["fold_points"] == 4 * 2 and smoothing["smoothed"] == sum(smoothing["by_input"].values())
    # The artifact holds the plan: each MatMulNBits at its module's bits and block.
    model = ir.load(auto_bundle / "model.onnx")
    seen = {}
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            seen[module_path(node)] = (node.attributes.get_int("bits"), node.attributes.get_int("block_size"))
    assert seen == {p: s for p, s in plan.items() if s[0] and p != "model.embed_tokens"}, (seen, plan)
    # KL to fp32 on the calibration windows, measured on the artifact in onnxruntime.
    decoder = build_decoder(read_checkpoint(trained_dir))
    windows = calibration_sequences(trained_dir, None, decoder.cfg.vocab_size, count=auto.SENSITIVITY_WINDOWS)
    runner = open_runtime(auto_bundle, manifest["artifacts"][0])
    kls = []
    for window in windows:
        ids = np.array([window], dtype=np.int64)
        logits, _ = runner.forward(ids, runner.empty_cache(), 0)
        with torch.no_grad():
            ref = torch.log_softmax(decoder(torch.tensor(ids), torch.ones(1, ids.shape[1], dtype=torch.long),
                                            torch.arange(ids.shape[1])[None], *decoder.empty_cache())[0], -1)
        art = torch.log_softmax(torch.from_numpy(np.asarray(logits, np.float32)), -1)
        kls.append(float((ref.exp() * (ref - art)).sum(-1).mean()))
    assert np.mean(kls) <= MAX_KL, (kls, report)
    # The build measured the same in its kl_calibration gate.
    validation = manifest["artifacts"][0]["validation"]
    assert validation["metrics"]["kl_calibration"] == pytest.approx(np.mean(kls), rel=1e-4)
    assert {"metric": "kl_calibration", "direction": "max", "limit": MAX_KL} | {
        "value": validation["metrics"]["kl_calibration"], "passed": True} in validation["gates"]


def test_an_artifact_over_max_kl_fails_its_gate_and_says_what_to_ask_for(trained_dir, tmp_path, monkeypatch):
    """A plan aimed over the target (the headroom turned the wrong way) yields artifacts over it: the build's
    kl_calibration gate, measured in onnxruntime, fails it and names a --max-kl that would do."""
    monkeypatch.setattr(auto, "PLAN_HEADROOM", 2.0)
    result = CliRunner().invoke(main, ["build", "--model", str(trained_dir), "--out", str(tmp_path / "o"), "--quiet",
                                       "--quant", "auto", "--max-kl", str(MAX_KL)])
    assert_one_line_error(result, 1, "kl_calibration = ", f"must be at most {MAX_KL:g}", "try --max-kl ")
    asked = float(result.output.split("try --max-kl ")[1].split()[0])
    assert 0 < asked < MAX_KL


def test_sensitivity_ranks_a_damaged_module_first(trained_dir):
    decoder = build_decoder(read_checkpoint(trained_dir))
    damaged = decoder.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():  # one outlier per block row stretches its int4 scale: the rest rounds to zero
        damaged[:, ::32] *= 40
    probe = Probe(decoder, calibration_sequences(trained_dir, None, decoder.cfg.vocab_size, count=2))
    kl = sensitivities(decoder, probe, {})
    ranked = sorted(kl, key=lambda p: -kl[p][(4, 128)])
    assert ranked[0] == "model.layers.1.mlp.up_proj", {p: kl[p][(4, 128)] for p in ranked[:3]}
    # And the plan fixes it first: at a target just below all-int4's KL, it is the one module upgraded.
    all_units = units(decoder)
    total = sum(kl[p][(4, 128)] for p in kl)
    plan = auto.greedy(all_units, kl, 0.9 * total, {})
    assert plan["model.layers.1.mlp.up_proj"] != (4, 128)


def test_pte_quantization_follows_the_plan(trained_dir):
    from compiler.executorch.export import ExecutorchDecoder
    from compiler.executorch.quantize import quantize_decoder

    decoder = build_decoder(read_checkpoint(trained_dir))
    plan = [(u.path, 4, 32) for u in units(decoder)]
    plan[0] = (plan[0][0], 8, 128)  # layer 0's qkv_proj int8
    plan[1] = (plan[1][0], 0, 0)  # its o_proj fp32
    plan += [("model.embed_tokens", 8, 128)]
    quant = QuantConfig(max_kl=0.1, plan=tuple(plan))
    counts = quantize_decoder(ExecutorchDecoder(decoder, 64), quant)
    assert counts == {"linear_8da8w_channel": 1, "linear_fp32": 1, "linear_8da4w_group32": 5 * 2 - 2 + 1,
                      "embedding_int8": 1}, counts


def test_a_plan_for_both_formats_is_measured_as_the_pte_computes(trained_dir):
    """With a .pte among the formats the plan is measured on XNNPACK's grid with per-token activations, the
    larger error of the two formats (so one plan holds for both), and carries GPTQ's codes for both grids."""
    decoder = build_decoder(read_checkpoint(trained_dir))
    both = auto.plan_auto(decoder, trained_dir, QuantConfig(max_kl=MAX_KL), grids=["onnx", "xnnpack"])
    assert both.summary["measured_as"] == "pte" and both.summary["met"], both.summary
    onnx_codes, pte_codes = both.precomputed["onnx"], both.precomputed["xnnpack"]
    assert onnx_codes.keys() == pte_codes.keys() and all(s.min() > 0 for _, s, _ in pte_codes.values())
    plan = {path: (bits, block) for path, bits, block in both.quant.plan}
    sequences = auto.probe_sequences(decoder, trained_dir, None)
    kl = {}
    for xnnpack, codes in ((False, onnx_codes), (True, pte_codes)):
        weights = lambda u, s, codes=codes, xnnpack=xnnpack: quantized_weights(decoder, u, s, {s[1]: codes}, xnnpack)  # noqa: E731
        kl[xnnpack] = mixed_kl(Probe(decoder, sequences, xnnpack=xnnpack), plan, units(decoder), weights)
    assert kl[True] <= MAX_KL and kl[False] < kl[True], kl


@pytest.mark.parametrize("args, fragments", [
    (["--quant", "auto", "--max-kl", "-1"], ["--max-kl -1", "above 0"]),
    (["--quant", "int4", "--max-kl", "0.2"], ["--max-kl 0.2", "--quant auto"]),
    (["--quant", "auto", "--asymmetric"], ["--asymmetric"]),
])
def test_bad_max_kl_is_a_one_line_usage_error(trained_dir, tmp_path, args, fragments):
    result = CliRunner().invoke(main, ["build", "--model", str(trained_dir), "--out", str(tmp_path / "o"), *args])
    assert_one_line_error(result, 2, *fragments)


def test_failed_int4_build_says_to_try_quant_auto(trained_dir, tmp_path):
    result = CliRunner().invoke(main, ["build", "--model", str(trained_dir), "--out", str(tmp_path / "o"), "--quiet",
                                       "--quant", "int4", "--algo", "rtn", "--gate", "kl_mean=1e-9"])
    assert_one_line_error(result, 1, "kl_mean", "--quant auto --max-kl", "largest int4 errors on calibration text: ")
    named = result.output.split("largest int4 errors on calibration text: ")[1].rstrip(")\n").split(", ")
    modules = {u.path for u in units(build_decoder(read_checkpoint(trained_dir)))}
    assert len(named) == 3 and set(named) <= modules, named


def test_failed_8bit_build_names_no_int4_modules(trained_dir, tmp_path):
    result = CliRunner().invoke(main, ["build", "--model", str(trained_dir), "--out", str(tmp_path / "o"), "--quiet",
                                       "--quant", "int4", "--keep-int8", ".", "--embedding-bits", "8",
                                       "--lm-head-bits", "8", "--gate", "kl_mean=1e-9"])
    assert_one_line_error(result, 1, "kl_mean", "no module is int4", "--quant auto --max-kl", "--keep-fp32")
    assert "largest int4 errors" not in result.output
