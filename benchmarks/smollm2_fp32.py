"""Acceptance run for the fp32 ONNX path on a 30-layer SmolLM2-135M-shaped Llama with a rank-16 adapter.

Builds with the real `edgec build` (in a child process: its wall time and peak RSS are the export's),
then checks the bundle against transformers + PEFT `merge_and_unload`: logits max-abs error on fixed
prompts, and 32 greedy tokens from edgec's runner and from onnxruntime-genai. Finally `edgec bench`.

    .venv/bin/python benchmarks/smollm2_fp32.py [--work DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler.fixtures import ALL_PROJECTIONS, SMOLLM2_135M, make_adapter, make_model  # noqa: E402
from runtimes.genai import GenaiRuntime  # noqa: E402
from runtimes.ort import OrtRuntime  # noqa: E402

GREEDY_TOKENS = 32


def edgec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("edgec")), *args], capture_output=True, text=True)


def timed_build(model: Path, adapter: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of `edgec build` as its own process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = edgec("build", "--model", str(model), "--adapter", str(adapter), "--out", str(out), "--quiet",
                 "--new-tokens", str(GREEDY_TOKENS))
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        sys.exit(f"edgec build failed:\n{proc.stderr}")
    if peak <= before:
        print("warning: peak RSS of the build is not above earlier children's; figure is a lower bound")
    return wall, peak / 1024


def reference_model(model: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgec" / "bench-smollm2")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    model_dir, adapter_dir, bundle = args.work / "model", args.work / "lora-r16", args.work / "bundle-fp32"
    if not (model_dir / "config.json").exists():
        print("making the SmolLM2-135M-shaped model ...", flush=True)
        make_model(model_dir, "llama", **SMOLLM2_135M)
    if not (adapter_dir / "adapter_config.json").exists():
        print("making the rank-16 adapter on all seven projections ...", flush=True)
        make_adapter(model_dir, adapter_dir, target_modules=ALL_PROJECTIONS, r=16, alpha=32)

    print("edgec build ...", flush=True)
    wall, peak = timed_build(model_dir, adapter_dir, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())

    print("transformers + PEFT merge_and_unload reference ...", flush=True)
    reference = reference_model(model_dir, adapter_dir)
    runner = OrtRuntime(bundle, threads=args.threads)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, SMOLLM2_135M["vocab_size"], size=n).tolist() for n in (16, 64)]
    max_abs, greedy = 0.0, []
    for prompt in prompts:
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0].numpy()
        max_abs = max(max_abs, float(np.abs(runner.logits(np.asarray([prompt]))[0] - expected).max()))
        hf = hf_greedy(reference, prompt, GREEDY_TOKENS)
        genai = GenaiRuntime(bundle).generate(prompt, GREEDY_TOKENS, stop_at_eos=False)
        greedy.append((hf == runner.generate(prompt, GREEDY_TOKENS), hf == genai))
    del runner, reference

    print("edgec bench ...", flush=True)
    proc = edgec("bench", str(bundle), "--prompt-tokens", "128", "--new-tokens", "128", "--repeats", "5",
                 "--threads", str(args.threads), "--json")
    if proc.returncode != 0:
        sys.exit(f"edgec bench failed:\n{proc.stderr}")
    result = json.loads(proc.stdout)
    size = sum(f["bytes"] for f in manifest["files"].values())
    rows = [
        ("model", "Llama, 30 layers, hidden 576, 9/3 heads, vocab 49152, tied; rank-16 LoRA on 7 projections"),
        ("edgec build wall time", f"{wall:.1f} s"),
        ("edgec build peak RSS", f"{peak:.0f} MB"),
        ("bundle size", f"{size / 1e6:.1f} MB"),
        ("logits max-abs vs transformers+PEFT", f"{max_abs:.2e} (gate 1e-3)"),
        (f"{GREEDY_TOKENS} greedy tokens = HF (edgec runner)", str(all(g[0] for g in greedy))),
        (f"{GREEDY_TOKENS} greedy tokens = HF (onnxruntime-genai)", str(all(g[1] for g in greedy))),
        ("edgec validation gates", "PASSED" if manifest["validation"]["passed"] else "FAILED"),
        ("load", f"{result['load_s'] * 1000:.0f} ms"),
        ("prefill, 128 tokens (median of 5)", f"{result['prefill_s'] * 1000:.1f} ms = {result['prefill_tokens_per_s']:.0f} tokens/s"),
        ("decode, 128 tokens (median of 5)", f"{result['decode_tokens_per_s']:.1f} tokens/s"),
        ("time to first token", f"{result['ttft_s'] * 1000:.1f} ms"),
        ("bench peak RSS", f"{result['peak_rss_mb']:.0f} MB"),
        ("threads", str(result["runtime"]["threads"])),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows))
    ok = max_abs <= 1e-3 and all(all(g) for g in greedy) and manifest["validation"]["passed"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
