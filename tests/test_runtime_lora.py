"""Runtime LoRA (--lora runtime): one base, one file per adapter (.onnx_adapter, and a .ptd beside the .pte's
foundation .ptd), switched at run time in onnxruntime-genai (its own Adapters API), edgec's runner and
ExecuTorch's runtime, each against transformers + PEFT."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compiler.cli import main
from compiler.tiny_models import ALL_PROJECTIONS, make_adapter, make_model
from runtimes.ort import OrtRuntime

PROMPT = [1, 17, 42, 99, 7, 250]
NEW_TOKENS = 12


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hf_greedy(base_dir, adapter_dir, prompt, new_tokens, eos=None):
    """transformers (+ PEFT when adapter_dir) greedy tokens, EOS masked as min_length does in genai."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            if eos is not None:
                logits[eos] = -float("inf")
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


@pytest.fixture(scope="module")
def lora_setup(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-lora")
    a = make_adapter(llama_dir, root / "adapter-a", target_modules=["q_proj", "v_proj"], r=4, alpha=8, seed=3)
    b = make_adapter(llama_dir, root / "adapter-b", target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                     r=8, alpha=4, seed=4, use_rslora=True)
    out = root / "bundle"
    result = run("build", "--model", llama_dir, "--adapter", f"a={a}", "--adapter", f"b={b}", "--lora", "runtime",
                 "--out", out, "--quiet", "--lora-targets", "down_proj", "--format", "onnx,pte", "--max-seq-len", 64)
    assert result.exit_code == 0, result.output
    return {"root": root, "a": a, "b": b, "bundle": out}


def test_two_unlike_adapters_switch_in_genai_like_peft(llama_dir, lora_setup):
    pytest.importorskip("onnxruntime_genai")
    from runtimes.genai import GenaiRuntime

    bundle = lora_setup["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["artifacts"][0]["lora"]["adapters"]}
    assert entries["a"]["ranks"] == [4] and entries["a"]["targets"] == ["q_proj", "v_proj"]
    assert entries["b"]["ranks"] == [8] and len(entries["b"]["targets"]) == 5
    slotted = {m.rsplit(".", 1)[1] for m in manifest["artifacts"][0]["lora"]["slots"]["modules"]}
    assert slotted == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}  # down_proj: --lora-targets
    for name in ("a", "b"):
        assert entries[name]["file_sha256"] == sha256(bundle / entries[name]["file"])
        assert manifest["files"][entries[name]["file"]]["sha256"] == entries[name]["file_sha256"]
        assert entries[name]["validation"]["passed"]
        assert entries[name]["validation"]["metrics"]["genai_greedy_match"] == 1.0
        assert entries[name]["validation"]["lora_retention"]["total"] > 0.99
    expected = {"a": hf_greedy(llama_dir, lora_setup["a"], PROMPT, NEW_TOKENS, eos=2),
                "b": hf_greedy(llama_dir, lora_setup["b"], PROMPT, NEW_TOKENS, eos=2),
                None: hf_greedy(llama_dir, None, PROMPT, NEW_TOKENS, eos=2)}
    assert len({tuple(v) for v in expected.values()}) == 3  # the adapters change the greedy tokens

    genai = GenaiRuntime(bundle)  # one process, one model: a, b, none, a
    for name in ("a", "b", None, "a"):
        genai.set_adapter(name)
        assert genai.generate(PROMPT, NEW_TOKENS, stop_at_eos=False) == expected[name], name

    ours = OrtRuntime(bundle)
    for name in ("b", None, "a"):
        ours.set_adapter(name)
        assert ours.generate(PROMPT, NEW_TOKENS) == hf_greedy(llama_dir, lora_setup.get(name), PROMPT, NEW_TOKENS), name


def test_pte_foundation_and_adapter_files_switch_like_peft(llama_dir, lora_setup, tmp_path):
    """One program and foundation model.ptd; an adapter is its own .ptd (the all-zero one is the base)."""
    from compiler.executorch.export import ExecutorchDecoder, runner_metadata
    from compiler.executorch.lora import export_pte_with_lora
    from compiler.frontend.load import build_decoder, read_checkpoint
    from runtimes.executorch import ExecutorchRuntime

    bundle = lora_setup["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    pte = next(a for a in manifest["artifacts"] if a["format"] == "pte")
    assert pte["data_files"] == ["model.ptd"] and pte["lora"]["base_adapter"] == "adapters/none.ptd"
    assert all(e["validation"]["passed"] for e in pte["lora"]["adapters"])
    runtime = ExecutorchRuntime(bundle)
    for name in ("a", "b", None, "a"):
        runtime.set_adapter(name)
        assert runtime.generate(PROMPT, 8) == hf_greedy(llama_dir, lora_setup.get(name), PROMPT, 8), name
    # The foundation holds the base only: another set of slots gives the same bytes.
    model = build_decoder(read_checkpoint(llama_dir))
    metadata = runner_metadata(model.cfg, 64, model.cfg.bos_token_id, list(model.cfg.eos_token_ids))
    export_pte_with_lora(ExecutorchDecoder(model, 64), {"model.layers.1.mlp.down_proj": (128, 64, 2)}, metadata, tmp_path)
    assert (tmp_path / "model.ptd").read_bytes() == (bundle / "model.ptd").read_bytes()
    assert (bundle / "model.pte").stat().st_size < (bundle / "model.ptd").stat().st_size / 4


def test_no_adapter_is_the_base_exactly(llama_dir, lora_setup, tmp_path):
    """The slots' empty defaults add exact zeros: the base alone equals a plain build bit for bit."""
    plain = tmp_path / "plain"
    assert run("build", "--model", llama_dir, "--out", plain, "--quiet", "--no-validate").exit_code == 0
    ids = np.array([PROMPT], dtype=np.int64)
    slotted = OrtRuntime(lora_setup["bundle"]).logits(ids)
    assert np.array_equal(slotted, OrtRuntime(plain).logits(ids))


def test_add_adapter_without_rebuilding_and_its_refusals(llama_dir, lora_setup, tmp_path):
    root, bundle = lora_setup["root"], lora_setup["bundle"]
    model_bytes = sha256(bundle / "model.onnx.data")
    c = make_adapter(llama_dir, root / "adapter-c", target_modules=["q_proj", "down_proj"], r=2, seed=5)
    result = run("add-adapter", bundle, "--adapter", f"c={c}", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = next(e for e in manifest["artifacts"][0]["lora"]["adapters"] if e["name"] == "c")
    assert entry["validation"]["passed"] and entry["validation"]["lora_retention"]["total"] > 0.99
    assert "adapters/c.onnx_adapter" in manifest["files"] and sha256(bundle / "model.onnx.data") == model_bytes
    pte_entry = next(e for a in manifest["artifacts"] if a["format"] == "pte" for e in a["lora"]["adapters"]
                     if e["name"] == "c")
    assert pte_entry["file"] == "adapters/c.ptd" and pte_entry["validation"]["passed"]
    runner = OrtRuntime(bundle)
    runner.set_adapter("c")
    assert runner.generate(PROMPT, 8) == hf_greedy(llama_dir, c, PROMPT, 8)

    before = (bundle / "manifest.json").read_bytes()
    no_slot = make_adapter(llama_dir, root / "no-slot", target_modules=["gate_proj"], r=2)
    too_big = make_adapter(llama_dir, root / "too-big", target_modules=["q_proj"], r=16)
    make_model(root / "narrow", "llama", tokenizer=False, hidden_size=32, intermediate_size=64)
    other_base = make_adapter(root / "narrow", root / "other-base", target_modules=["q_proj"], r=2)
    cases = [(f"x={no_slot}", "has no LoRA slot"), (f"y={too_big}", "above the bundle's LoRA slots' max rank 8"),
             (f"c={c}", "already has an adapter named 'c'"), (f"z={other_base}", "another base")]
    for spec, message in cases:
        result = run("add-adapter", bundle, "--adapter", spec, "--quiet")
        assert result.exit_code == 2 and message in result.output, (spec, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert (bundle / "manifest.json").read_bytes() == before

    merged = tmp_path / "merged"
    assert run("build", "--model", llama_dir, "--adapter", c, "--out", merged, "--quiet", "--no-validate").exit_code == 0
    result = run("add-adapter", merged, "--adapter", f"c={c}")
    assert result.exit_code == 2 and "--lora runtime" in result.output


def test_bench_with_an_adapter(lora_setup):
    bundle = lora_setup["bundle"]
    result = run("bench", bundle, "--adapter", "b", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1",
                 "--json", "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["runtime"]["adapter"] == "b" and data["runtime"]["adapter_load_s"] > 0
    result = run("bench", bundle, "--adapter", "nope", "--quiet")
    assert result.exit_code == 2 and "not an adapter" in result.output


def test_int4_base_with_runtime_adapters_keeps_the_merged_builds_quality(trained_dir, tmp_path):
    """int4 base + fp16 LoRA branches: the adapter's KL to its own reference (the fp32 base with it merged),
    on 4 windows of 128 tokens of calibration text (the 3 short validation prompts are too few to compare
    two int4 builds), is within 1.5x of the same adapter merged before int4 quantization (whose GPTQ also
    saw the adapter's activations)."""
    from compiler.build import load_reference
    from compiler.frontend.lora import AdapterSpec
    from compiler.quant.gptq import calibration_sequences
    from compiler.report import BuildReport

    adapter = make_adapter(trained_dir, tmp_path / "adapter", target_modules=ALL_PROJECTIONS, r=8, seed=7)
    common = ["--model", trained_dir, "--quant", "int4", "--quiet", "--new-tokens", "8"]
    assert run("build", *common, "--adapter", f"t={adapter}", "--lora", "runtime", "--out", tmp_path / "rt").exit_code == 0
    assert run("build", *common, "--adapter", adapter, "--out", tmp_path / "merged").exit_code == 0
    runtime = json.loads((tmp_path / "rt" / "manifest.json").read_text())["artifacts"][0]
    entry = runtime["lora"]["adapters"][0]
    assert runtime["lora"]["slots"]["dtype"] == "fp16"
    assert entry["bytes"] <= 1.1 * entry["tensor_bytes"]  # the file is its fp16 A/B tensors, little else
    assert entry["validation"]["passed"]
    reference = load_reference(trained_dir, [AdapterSpec(adapter)], BuildReport(quiet=True), with_lora_reference=False).model
    windows = calibration_sequences(trained_dir, None, reference.cfg.vocab_size, count=4)
    with_adapter = OrtRuntime(tmp_path / "rt")
    with_adapter.set_adapter("t", tmp_path / "rt" / entry["file"])
    kl = {}
    for name, runner in (("runtime", with_adapter), ("merged", OrtRuntime(tmp_path / "merged"))):
        values = []
        for window in windows:
            ids = np.array([window], dtype=np.int64)
            logits, _ = runner.forward(ids, runner.empty_cache(), 0)
            with torch.no_grad():
                ref = torch.log_softmax(reference(torch.tensor(ids), torch.ones_like(torch.tensor(ids)),
                                                  torch.arange(ids.shape[1])[None], *reference.empty_cache())[0], -1)
            art = torch.log_softmax(torch.from_numpy(np.asarray(logits, np.float32)), -1)
            values.append(float((ref.exp() * (ref - art)).sum(-1).mean()))
        kl[name] = float(np.mean(values))
    assert kl["runtime"] <= 1.5 * kl["merged"] + 1e-4, kl
