"""Acceptance run for the fp32 ONNX path on the SmolLM2-135M-shaped Llama + rank-16 LoRA: build cost, accuracy
against transformers + PEFT, greedy tokens (edgec's runner and onnxruntime-genai), then `edgec bench`.

    python -m benchmarks.smollm2_fp32 [--work DIR] [--threads N]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (EDGEC, SMOLLM2_WORK, argument_parser, edgec, merge_with_peft, smollm2_with_adapter,
                               timed)
from compiler.tiny_models import SMOLLM2_135M
from runtimes.genai import GenaiRuntime
from runtimes.ort import OrtRuntime

GREEDY_TOKENS = 32


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def main() -> None:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--work", type=Path, default=SMOLLM2_WORK)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    model_dir, adapter_dir = smollm2_with_adapter(args.work)
    bundle = args.work / "bundle-fp32"

    print("edgec build ...", flush=True)  # in its own process: its wall time and peak RSS are the export's
    wall, peak = timed([EDGEC, "build", "--model", model_dir, "--adapter", adapter_dir, "--out", bundle, "--quiet",
                        "--new-tokens", GREEDY_TOKENS])
    manifest = json.loads((bundle / "manifest.json").read_text())

    print("transformers + PEFT merge_and_unload reference ...", flush=True)
    reference = merge_with_peft(model_dir, adapter_dir).eval()
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
    result = json.loads(edgec("bench", bundle, "--prompt-tokens", "128", "--new-tokens", "128", "--repeats", "5",
                              "--threads", args.threads, "--json"))
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
