"""End to end on the ONNX path: build through the CLI, then check the bundle, the runtimes and the gates."""

import hashlib
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import compiler
from compiler.cli import main
from compiler.quant.cpu_linalg import use_bf16, use_onednn
from runtimes.ort import OrtRuntime


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bundle(llama_dir, llama_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "llama"
    result = run("build", "--model", llama_dir, "--adapter", f"{llama_adapter}:0.8", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_bundle_contents_and_manifest(bundle, llama_dir, llama_adapter):
    names = {p.name for p in bundle.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "manifest.json", "report.json", "report.md",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "edgec-bundle" and manifest["schema_version"] == 1
    assert manifest["edgec_version"]
    machine = manifest["build_machine"]  # what explains two bundles of other machines differing in the last bits
    assert machine["arch"] == platform.machine() and machine["cpu_model"]
    assert machine["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["calibration_matmul"] == ("onednn" if use_onednn() else "mkl")
    assert machine["calibration_bf16"] == use_bf16()
    assert machine["libraries"]["torch"] == torch.__version__ and machine["libraries"]["onnxruntime"]
    assert manifest["build_config"]["adapters"] == [{"path": str(llama_adapter), "weight": 0.8}]
    sources = manifest["source"]["model"]["sha256"]
    assert sources["model.safetensors"] == sha256(llama_dir / "model.safetensors")
    assert sources["config.json"] == sha256(llama_dir / "config.json")
    assert manifest["source"]["adapters"][0]["sha256"]["adapter_model.safetensors"] == sha256(
        llama_adapter / "adapter_model.safetensors")
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256(bundle / name) and entry["bytes"] == (bundle / name).stat().st_size
    io = manifest["artifacts"][0]["io"]
    assert [i["name"] for i in io["inputs"][:3]] == ["input_ids", "attention_mask", "position_ids"]
    assert io["kv_cache"]["num_layers"] == 2 and io["kv_cache"]["layout"] == "BNSH"
    assert manifest["validation"]["passed"]
    assert manifest["validation"]["metrics"]["greedy_match"] == 1.0


def test_onnx_graph_has_dynamic_kv_cache_io(bundle):
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["present.0.key"] == ["batch_size", 2, "total_sequence_length", 16]
    assert dims["logits"] == ["batch_size", 1, 512]  # --logits last, the default
    assert all(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer if init.dims and np.prod(init.dims) > 1024)


def test_build_report_lists_adapter_modules(bundle):
    report = json.loads((bundle / "report.json").read_text())
    adapter = report["adapters"][0]
    assert adapter["modules_merged"] == 14
    q = next(m for m in adapter["modules"] if m["module"] == "model.layers.0.self_attn.q_proj")
    assert q["rank"] == 4 and q["scale"] == pytest.approx(8 / 4 * 0.8)
    assert [s["stage"] for s in report["stages"]] == ["load", "merge_lora", "reference", "export_onnx", "onnx_passes", "write_bundle",
                                                     "validate"]
    fused = {p["pass"]: p for p in report["passes"]}
    assert fused["FuseGroupQueryAttentionPass"]["rewrites"]["group_query_attention"] == 2
    assert report["export"]["op_counts"]["GroupQueryAttention"] == 2
    assert "q_proj" in (bundle / "report.md").read_text()


def test_same_inputs_give_byte_identical_model_files(bundle, llama_dir, llama_adapter, tmp_path):
    result = run("build", "--model", llama_dir, "--adapter", f"{llama_adapter}:0.8", "--out", tmp_path / "again",
                 "--quiet", "--no-validate")
    assert result.exit_code == 0, result.output
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert sha256(bundle / name) == sha256(tmp_path / "again" / name), name
    # Nor do they depend on where edgec is installed: no source paths (the exporter's stack traces) inside.
    source_dir = str(Path(compiler.__file__).resolve().parent.parent).encode()
    assert source_dir not in (bundle / "model.onnx").read_bytes()


def test_interrupted_build_leaves_no_bundle(llama_dir, tmp_path, monkeypatch):
    import compiler.onnx.export as export

    def interrupted(model, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_onnx", interrupted)
    out = tmp_path / "out"
    result = run("build", "--model", llama_dir, "--out", out, "--quiet")
    assert result.exit_code == 130
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor a staging directory


def test_a_build_removes_what_killed_builds_of_the_same_output_left(tmp_path):
    """A build killed outright (OOM killer, kill -9) cannot clean up its staging directory; the next build
    of that output removes it, and leaves alone those of builds still running."""
    import os
    import subprocess
    import sys

    from compiler.bundle import BundleWriter

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    stale = [tmp_path / f".out.edgec-staging-{dead_pid}", tmp_path / f".out.edgec-old-{dead_pid}"]
    running = tmp_path / f".out.edgec-staging-{os.getppid()}"
    other_output = tmp_path / f".other.edgec-staging-{dead_pid}"
    for directory in (*stale, running, other_output):
        directory.mkdir()
        (directory / "model.pte").write_bytes(b"x")
    writer = BundleWriter(tmp_path / "out", force=False)
    assert not stale[0].exists()
    assert stale[1].exists()  # no bundle at out: the moved-aside previous one may be the only copy
    assert running.exists() and other_output.exists() and writer.staging.is_dir()
    writer.finish({})
    BundleWriter(tmp_path / "out", force=True).abort()
    assert not stale[1].exists()  # out holds a bundle now: the old one was superseded


def test_interrupted_rebuild_keeps_the_previous_bundle(bundle, llama_dir, tmp_path, monkeypatch):
    import compiler.onnx.export as export

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    before = {p.name: sha256(p) for p in copy.iterdir()}
    monkeypatch.setattr(export, "export_onnx", lambda model, **options: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert run("build", "--model", llama_dir, "--out", copy, "--quiet").exit_code == 130
    assert {p.name: sha256(p) for p in copy.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_force_moves_user_directory_aside(llama_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run("build", "--model", llama_dir, "--out", out, "--quiet", "--no-validate", "--force")
    assert result.exit_code == 0, result.output
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("mine.backup-")]
    assert len(backups) == 1 and (backups[0] / "notes.txt").read_text() == "keep me"
    assert (out / "manifest.json").exists() and "moved the existing" in result.stderr


def test_inspect(bundle):
    result = run("inspect", bundle)
    assert result.exit_code == 0
    assert "llama, 2 layers" in result.output and "past_key_values.%d.key" in result.output
    assert "validation: PASSED" in result.output and "model.onnx.data" in result.output
    assert json.loads(run("inspect", bundle, "--json").output)["format"] == "edgec-bundle"


def test_validate_passes_and_a_strict_gate_fails_with_the_metric_named(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    ok = run("validate", copy, "--new-tokens", "4")
    assert ok.exit_code == 0, ok.output
    assert "validation: PASSED" in ok.output
    strict = run("validate", copy, "--gate", "max_abs_logits=1e-12", "--new-tokens", "4")
    assert strict.exit_code == 1
    assert "max_abs_logits" in strict.stderr and "x the limit" in strict.stderr
    assert json.loads((copy / "manifest.json").read_text())["validation"]["passed"] is False


def test_bench_json(bundle):
    result = run("bench", bundle, "--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["schema"] == "edgec.bench/1" and data["runtime"]["name"] == "onnxruntime"
    for key in ("load_s", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb"):
        assert data[key] > 0, key
    assert len(data["samples"]["decode_s"]) == 2
    assert data["artifact_bytes"] == sum(p.stat().st_size for p in bundle.iterdir())
    manifest_sha = sha256(bundle / "manifest.json")
    assert data["bundle"]["manifest_sha256"] == manifest_sha
    assert 20 < data["peak_rss_mb"] < 400  # the agent's own process, not the compiler's
    table = run("bench", bundle, "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1")
    assert "decode (4 tokens)" in table.output and "tokens/s" in table.output


def test_onnxruntime_genai_runs_the_bundle_as_is(bundle):
    pytest.importorskip("onnxruntime_genai")
    from runtimes.genai import GenaiRuntime

    genai = GenaiRuntime(bundle)
    prompt = genai.encode("The quick brown fox")
    tokens = genai.generate(prompt, 12)
    ours = OrtRuntime(bundle).generate(prompt, 12, eos_ids=(2,))
    assert tokens == ours and len(tokens) >= 1


def test_last_position_logits_match_a_build_with_all_positions(bundle, llama_dir, llama_adapter, tmp_path):
    """The default graph computes the lm_head on the last position only; the runner gives the other positions
    from single-token steps, which agree with a --logits all build's single prefill."""
    out = tmp_path / "all"
    result = run("build", "--model", llama_dir, "--adapter", f"{llama_adapter}:0.8", "--out", out, "--logits", "all",
                 "--no-validate", "--quiet")
    assert result.exit_code == 0, result.output
    every, last = OrtRuntime(out), OrtRuntime(bundle)
    assert not every.last_position_logits and last.last_position_logits
    ids = np.asarray([[1, 40, 41, 42, 43, 44, 45]])
    logits, _ = last._run(ids, last.empty_cache(), 0)
    assert logits.shape == (1, 1, 512)
    np.testing.assert_allclose(last.logits(ids), every.logits(ids), atol=1e-4, rtol=0)
    assert last.generate(ids[0].tolist(), 8, eos_ids=()) == every.generate(ids[0].tolist(), 8, eos_ids=())
    # Every position's logits in the shared-buffer loop: chunks of other lengths (a context filled in chunks,
    # then the prompt), then single steps, as the copying loop computes them.
    shared, copying = every.start_sequence(32, shared_buffer=True), every.start_sequence(32, shared_buffer=False)
    position, returned = 0, []
    for chunk in ([1, 40, 41, 42, 43], [44, 45, 46], [47, 48], [49], [50]):
        ids = np.asarray([chunk])
        returned.append(shared(ids, position))
        np.testing.assert_allclose(returned[-1], copying(ids, position), atol=1e-5, rtol=0)
        position += len(chunk)
    assert not np.allclose(returned[0], returned[1]) and not np.allclose(returned[3], returned[4])


def test_threads_option_goes_into_genai_config(bundle, llama_dir, tmp_path):
    """genai's default is half the logical cores; --threads N writes N for apps, and the runner can override."""
    pytest.importorskip("onnxruntime_genai")
    from runtimes.genai import GenaiRuntime

    assert "intra_op_num_threads" not in json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"][
        "session_options"]
    out = tmp_path / "b"
    result = run("build", "--model", llama_dir, "--out", out, "--threads", "2", "--no-validate", "--quiet")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2
    assert json.loads((out / "manifest.json").read_text())["build_config"]["export"]["threads"] == 2
    prompt = [1, 40, 41, 42]
    assert GenaiRuntime(out).generate(prompt, 8, stop_at_eos=False) == \
        GenaiRuntime(out, threads=1).generate(prompt, 8, stop_at_eos=False)


@pytest.mark.parametrize("variant", ["llama3_tied", "qwen2", "phi3_partial_rotary", "phi4_longrope"])
def test_each_family_builds_and_passes_its_gates(model_dir, variant, tmp_path):
    result = run("build", "--model", model_dir(variant), "--out", tmp_path / "b", "--quiet", "--new-tokens", "8")
    assert result.exit_code == 0, result.output
    if variant == "phi4_longrope":
        assert "capped there (the model claims 256)" in result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["validation"]["passed"] and manifest["validation"]["metrics"]["max_abs_logits"] < 1e-4


def test_build_never_writes_the_users_files(llama_dir, llama_adapter, bundle):
    """The LoRA merge runs in place on memory-mapped checkpoint tensors: the files must stay as they were."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["model"]["sha256"]["model.safetensors"] == sha256(llama_dir / "model.safetensors")
    before = {p.name: sha256(p) for p in [*llama_dir.iterdir(), *llama_adapter.iterdir()] if p.is_file()}
    from compiler.frontend.load import read_checkpoint
    from compiler.frontend.lora import AdapterSpec, merge_lora

    checkpoint = read_checkpoint(llama_dir)
    merge_lora(checkpoint, [AdapterSpec(llama_adapter, 3.0)])
    del checkpoint
    after = {p.name: sha256(p) for p in [*llama_dir.iterdir(), *llama_adapter.iterdir()] if p.is_file()}
    assert before == after


def test_shared_kv_buffer_decoding_equals_the_copying_loop(bundle):
    """The bench loop binds past and present to one buffer per layer (as onnxruntime-genai does); it must
    produce the tokens the plain past/present loop produces."""
    runner = OrtRuntime(bundle)
    assert runner.shares_buffer
    prompt = [1, 17, 230, 45, 99, 310, 7]
    assert runner.generate(prompt, 12, shared_buffer=True) == runner.generate(prompt, 12, shared_buffer=False)
    # Step by step, logits too: the shared loop keeps its bindings (and a decode step's logits buffer) across
    # steps, so a step reading the last step's inputs or logits would show here.
    shared, copying = runner.start_sequence(32, shared_buffer=True), runner.start_sequence(32, shared_buffer=False)
    steps = [np.asarray([prompt])] + [np.asarray([[token]]) for token in (5, 300, 5, 77)]
    position, seen = 0, []
    for ids in steps:
        logits = shared(ids, position)
        np.testing.assert_allclose(logits, copying(ids, position), atol=1e-5, rtol=0)
        seen.append(logits)
        position += ids.shape[1]
    assert not np.allclose(seen[1], seen[3])  # the same token at another position: other logits, kept apart
