"""A build's memory: the estimate, --memory-budget (plan or refuse), and the checkpoint's pages handed back."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from compiler.cli import main
from compiler.errors import UsageError
from compiler.memory import WeightFacts, estimate, plan, release_pages
from runtimes.base import transparent_huge_pages


def rss_file_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssFile:"))


def test_release_pages_drops_clean_mapped_pages_only(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"clean": torch.randn(2048, 1024), "merged": torch.randn(2048, 1024)}, str(path))  # 8 MiB each
    with safe_open(str(path), framework="pt") as f:
        clean, merged = f.get_tensor("clean"), f.get_tensor("merged")
    expected_clean = clean.clone()
    merged.add_(1.0)  # written in place, as a LoRA merge does: private pages that must survive
    expected_merged = merged.clone()
    own = torch.ones(2**20)  # anonymous memory, not from a file
    clean.sum()  # its pages resident
    before = rss_file_mb()
    released = release_pages(clean, merged, own, clean.numpy().T)
    assert 7.9 * 2**20 < released <= 8 * 2**20  # the clean tensor's whole pages, once, and nothing else
    assert before - rss_file_mb() > 7
    assert torch.equal(clean, expected_clean)  # read back from the file
    assert torch.equal(merged, expected_merged)
    assert torch.equal(own, torch.ones(2**20))


@pytest.mark.skipif(not sys.platform.startswith("linux") or transparent_huge_pages() == "always",
                    reason="madvise(MADV_POPULATE_WRITE) is Linux's; counts 4 KiB page faults")
def test_populate_for_write_breaks_copy_on_write_in_one_call(tmp_path):
    """The merge's in-place write into a tensor of a private file map: after populate_for_write it takes
    (almost) no page faults, the tensor keeps its values, and the file is not written."""
    import resource

    from compiler.memory import populate_for_write

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(2048, 1024), "b": torch.randn(2048, 1024)}, str(path))  # 8 MiB each
    on_disk = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        populated, faulting = f.get_tensor("a"), f.get_tensor("b")
    expected = populated + 1.0

    def faults_of_adding_one(tensor):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tensor.add_(1.0)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    populate_for_write(populated)
    pages = 8 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert faults_of_adding_one(populated) < pages * 0.05
    assert faults_of_adding_one(faulting) > pages * 0.5  # without it: a copy-on-write fault a page
    assert torch.equal(populated, expected)
    assert path.read_bytes() == on_disk


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_memory_budget_is_a_usage_error(llama_dir, tmp_path):
    line = one_line_error(run("build", "--model", llama_dir, "--out", tmp_path / "out", "--memory-budget", "6XB"))
    assert "--memory-budget 6XB" in line and "2GB" in line


def test_a_build_that_cannot_fit_refuses_at_the_start(llama_dir, tmp_path):
    line = one_line_error(run("build", "--model", llama_dir, "--out", tmp_path / "out", "--quant", "int4",
                              "--memory-budget", "100MB"))
    needed = re.search(r"--memory-budget 100 MB: this build needs about (\d+) MB at its peak \((\w+)\)", line)
    assert needed and int(needed.group(1)) > 100, line
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written


def test_a_tight_budget_takes_gptq_windows_of_fewer_layers():
    from compiler.config import BuildConfig, ModelConfig, QuantConfig
    from compiler.models.families import decoder_config
    from compiler.quant.gptq import HESSIAN_BUDGET_BYTES
    from compiler.tiny_models import SMOLLM2_135M, hf_config

    # The 135M shape's facts come from its config alone: no weight is made or read.
    facts = WeightFacts.of(decoder_config(hf_config("llama", **SMOLLM2_135M), "llama", "config.json", None), [])
    config = BuildConfig(ModelConfig(Path("m")), Path("out"))
    config.export.quant = QuantConfig()
    default = plan(facts, config)
    assert default.gptq_hessian_bytes == HESSIAN_BUDGET_BYTES and default.peak_stage == "calibrate_gptq"
    config.memory_budget_mb = default.peak_mb - 60
    tight = plan(facts, config)
    assert facts.layer_hessians_bytes <= tight.gptq_hessian_bytes < HESSIAN_BUDGET_BYTES
    assert tight.peak_mb <= config.memory_budget_mb
    config.memory_budget_mb = estimate(facts, ("onnx",), config.export.quant, True, 1).peak_mb - 1
    with pytest.raises(UsageError, match=r"\(calibrate_gptq\).* estimates with --algo rtn \d+ MB"):
        plan(facts, config)  # even GPTQ windows of one layer do not fit: refused, saying what would


def test_the_estimate_holds_the_tensors_merged_adapters_write(llama_dir, tmp_path):
    # The merge writes into the mapped checkpoint's private pages, which then stay resident to the build's end:
    # the estimate counts every tensor an adapter merges into (q_proj, embed_tokens) or replaces (lm_head).
    from compiler.frontend.load import read_model_files
    from compiler.frontend.lora import AdapterSpec, merged_tensors
    from compiler.tiny_models import make_adapter

    adapter = make_adapter(llama_dir, tmp_path / "lora", target_modules=["q_proj", "embed_tokens"],
                           modules_to_save=["lm_head"])
    files = read_model_files(llama_dir)
    layers = files.config.num_layers
    written = merged_tensors([AdapterSpec(adapter)])
    assert written == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(layers)} | {
        "model.embed_tokens.weight", "lm_head.weight"}
    with safe_open(str(llama_dir / "model.safetensors"), framework="pt") as f:
        written_mb = sum(f.get_tensor(name).numel() for name in written) * 4 / 2**20
    plain, merged = WeightFacts.of(files.config, files.weight_files), WeightFacts.of(files.config, files.weight_files, written)
    assert plain.stored_fp32 and plain.merged_mb == 0 and merged.merged_mb == pytest.approx(written_mb)
    from compiler.config import QuantConfig

    without, with_adapter = (estimate(facts, ("onnx", "pte"), QuantConfig(), True).stages for facts in (plain, merged))
    for stage in ("calibrate_gptq", "export_onnx", "onnx_passes", "validate", "quantize_pte", "export_pte"):
        assert with_adapter[stage] == pytest.approx(without[stage] + written_mb), stage
    assert merged_tensors([AdapterSpec(tmp_path / "missing")]) == set()  # the merge names what is wrong
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"[" * 16)
    assert merged_tensors([AdapterSpec(tmp_path / "corrupt")]) == set()


def test_the_estimate_unties_a_model_whose_lm_head_an_adapter_saves(model_dir, tmp_path):
    # merge_lora gives a tied model a new fp32 head of its own, quantized apart from the table.
    from compiler.frontend.load import read_model_files
    from compiler.frontend.lora import AdapterSpec, merged_tensors
    from compiler.tiny_models import make_adapter

    base = model_dir("llama3_tied")
    adapter = make_adapter(base, tmp_path / "lora", target_modules=["q_proj"], modules_to_save=["lm_head"])
    files = read_model_files(base)
    written = merged_tensors([AdapterSpec(adapter)])
    assert "lm_head.weight" in written
    plain, merged = WeightFacts.of(files.config, files.weight_files), WeightFacts.of(files.config, files.weight_files, written)
    table_mb = plain.embedding_elements * 4 / 2**20
    assert plain.tied and not merged.tied and merged.int4_elements == plain.int4_elements + plain.embedding_elements
    assert merged.fp32_mb == pytest.approx(plain.fp32_mb + table_mb) and merged.merged_mb > table_mb


def test_the_build_records_its_estimate_beside_the_measured_peak(llama_dir, tmp_path):
    # A process of its own: the peak measured is the build's, not this test session's. It traces: the
    # estimate is the tracing build's; one that writes its layer graph (layer_graph.py) or finds its trace
    # cached imports no torch.export and peaks about 80 MB lower (on this tiny model, 30% under the estimate).
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "compiler.cli", "build", "--model", str(llama_dir), "--out", str(out),
                    "--quant", "int4", "--algo", "rtn", "--no-validate", "--quiet", "--memory-budget", "2GB"],
                   check=True, capture_output=True, cwd=Path(__file__).resolve().parent.parent,
                   env={**os.environ, "EDGEC_TRACE_CACHE": "0", "EDGEC_WRITE_LAYER": "0"})
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    memory = report["memory"]
    assert manifest["memory"] == memory and manifest["build_config"]["memory_budget_mb"] == 2048
    assert memory["budget_mb"] == 2048 and memory["measured_peak_mb"] == round(report["peak_rss_mb"])
    assert abs(memory["measured_peak_mb"] / memory["estimate_mb"] - 1) < 0.25, memory
    assert set(memory["stages"]) == {"load", "export_onnx", "onnx_passes"}
    assert "estimated at the start" in (out / "report.md").read_text()


REUSED_HEAP_SCRIPT = """
import resource
import torch
from compiler.memory import reused_heap

def faults_of(elements):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(elements).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

torch.set_num_threads(1)
outside = [faults_of(2**24), faults_of(2**24 - 2**18)]
with reused_heap():
    inside = [faults_of(2**24), faults_of(2**24 - 2**18)]
after = [faults_of(2**24)]
print(outside, inside, after)
"""


@pytest.mark.skipif(transparent_huge_pages() == "always", reason="counts 4 KiB page faults")
def test_reused_heap_serves_a_freed_large_block_again_without_faulting():
    # A process of its own: malloc's settings are the whole process's (and none of a huge-page tunable).
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", REUSED_HEAP_SCRIPT], check=True, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent, env=env)
    outside, inside, after = (json.loads(part + "]") for part in result.stdout.strip()[:-1].split("] "))
    pages = 2**26 // os.sysconf("SC_PAGE_SIZE")  # of 64 MiB
    assert min(outside) > pages * 0.9  # glibc maps each anew: the kernel faults in (and zeroes) every page
    assert inside[0] > pages * 0.9 and inside[1] < pages * 0.05  # the 60 MiB one takes the freed block's pages
    assert after[0] > pages * 0.9  # the heap's free pages went back on exit


def test_outside_heap_is_a_writable_array_of_its_own():
    import numpy as np

    from compiler.memory import outside_heap

    a = outside_heap((3, 5), np.uint8)
    assert a.shape == (3, 5) and a.dtype == np.uint8 and a.flags.writeable and a.flags.c_contiguous
    a[...] = 7
    assert int(a.sum()) == 105 and outside_heap((0,), np.float32).shape == (0,)
