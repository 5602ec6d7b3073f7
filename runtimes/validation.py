"""An artifact against its reference's golden data: the metrics the validation gates read.

The reference (the PyTorch model, fp32) is computed once by the build and stored in the bundle as
golden.npz: the validation prompts, the reference's logits at every prompt position, its greedy tokens.
Comparing needs only numpy and the artifact's runtime, so the same code runs in the build and on a device
(`python -m runtimes.validation BUNDLE --format onnx`, which prints the metrics as JSON).

Metrics per prompt: all-position and last-position logits max-abs error, relative L2 error, top-1
agreement, KL divergence of the artifact's distribution from the reference's, next-token NLL, and greedy
generation with the position of the first divergence. The artifact's prompt logits come from two chunks (a
prefill and a continuation on the KV cache), so the cache path is checked as well as the prefill; an
artifact with last-position logits (a .pte, an ONNX build with --logits last) gives each chunk's last from
its prefill and the other positions from single-token steps.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

GOLDEN_FILE = "golden.npz"


def log_softmax(x):
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logit_metrics(reference, artifact) -> dict:
    """Metrics over [positions, vocab] logits."""
    diff = np.abs(artifact.astype(np.float64) - reference.astype(np.float64))
    log_p, log_q = log_softmax(reference), log_softmax(artifact)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return {
        "max_abs_logits": float(diff.max()),
        "max_abs_last_logits": float(diff[-1].max()),
        "rel_l2_logits": float(np.linalg.norm(diff) / max(np.linalg.norm(reference), 1e-30)),
        "rel_l2_last_logits": float(np.linalg.norm(diff[-1]) / max(np.linalg.norm(reference[-1]), 1e-30)),
        "top1_agreement": float((reference.argmax(-1) == artifact.argmax(-1)).mean()),
        "kl_mean": float(max(kl.mean(), 0.0)),
        "kl_max": float(max(kl.max(), 0.0)),
    }


def next_token_nll(logits, ids: list) -> float:
    """Mean negative log-likelihood of ids[1:] given the logits at the positions before them."""
    log_p = log_softmax(logits[:-1])
    return float(-log_p[np.arange(len(ids) - 1), ids[1:]].mean())


def first_divergence(a: list, b: list):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(runner, golden: dict, progress: Callable[[int, int], None] = lambda done, total: None) -> tuple:
    """(per-prompt metrics, the worst of each over the prompts with the prompts' perplexities, the
    artifact's log-probabilities per prompt). `golden`: prompts, logits and greedy tokens of the reference.
    progress(done, total): prompts compared."""
    per_prompt, artifact_logprobs = [], []
    for ids, ref, ref_tokens in zip(golden["prompts"], golden["logits"], golden["tokens"]):
        split = max(1, len(ids) // 2)
        head, cache = runner.forward(np.asarray([ids[:split]], dtype=np.int64), runner.empty_cache(), 0)
        tail, _ = runner.forward(np.asarray([ids[split:]], dtype=np.int64), cache, split)
        art = np.concatenate([head[0], tail[0]], axis=0)
        artifact_logprobs.append(log_softmax(art))
        metrics = logit_metrics(ref, art)
        metrics["nll_reference"], metrics["nll_artifact"] = next_token_nll(ref, ids), next_token_nll(art, ids)
        divergence = first_divergence(ref_tokens, runner.generate(ids, len(ref_tokens)))
        metrics.update(prompt_tokens=len(ids), greedy_tokens=len(ref_tokens), greedy_first_divergence=divergence,
                       greedy_match=1.0 if divergence is None else divergence / len(ref_tokens))
        per_prompt.append(metrics)
        progress(len(per_prompt), len(golden["prompts"]))
    worst = {}
    for key in ("max_abs_logits", "max_abs_last_logits", "rel_l2_logits", "rel_l2_last_logits", "kl_mean", "kl_max"):
        worst[key] = max(p[key] for p in per_prompt)
    for key in ("top1_agreement", "greedy_match"):
        worst[key] = min(p[key] for p in per_prompt)
    # Perplexity of the prompts themselves (mean next-token NLL over all prompts), reference vs artifact.
    prompts = golden["prompts"]
    tokens = sum(len(ids) - 1 for ids in prompts)
    nll_ref = sum(p["nll_reference"] * (len(ids) - 1) for p, ids in zip(per_prompt, prompts)) / tokens
    nll_art = sum(p["nll_artifact"] * (len(ids) - 1) for p, ids in zip(per_prompt, prompts)) / tokens
    worst["perplexity_reference"] = float(np.exp(nll_ref))
    worst["perplexity_artifact"] = float(np.exp(nll_art))
    worst["perplexity_ratio"] = float(np.exp(nll_art - nll_ref))
    return per_prompt, worst, artifact_logprobs


def save_golden(path, golden: dict) -> None:
    """golden.npz: arrays only (np.load needs no pickle to read it back)."""
    arrays = {}
    for i, (ids, logits, tokens) in enumerate(zip(golden["prompts"], golden["logits"], golden["tokens"])):
        arrays[f"prompt_{i}"] = np.asarray(ids, dtype=np.int64)
        arrays[f"logits_{i}"] = np.asarray(logits, dtype=np.float32)
        arrays[f"tokens_{i}"] = np.asarray(tokens, dtype=np.int64)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_golden(path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        count = sum(1 for name in data.files if name.startswith("prompt_"))
        return {"prompts": [data[f"prompt_{i}"].tolist() for i in range(count)],
                "logits": [data[f"logits_{i}"] for i in range(count)],
                "tokens": [data[f"tokens_{i}"].tolist() for i in range(count)]}


def main(argv: list | None = None) -> int:
    """The device side of `edgec validate --device`: the metrics of one artifact of the bundle, as JSON."""
    import argparse
    import json
    import os

    from runtimes.base import local_device_facts
    from runtimes.registry import open_runtime

    parser = argparse.ArgumentParser(prog="runtimes.validation", description=main.__doc__)
    parser.add_argument("bundle")
    parser.add_argument("--format", required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    with open(os.path.join(args.bundle, "manifest.json")) as f:
        manifest = json.load(f)
    artifact = next(a for a in manifest["artifacts"] if a["format"] == args.format)
    runner = open_runtime(args.bundle, artifact, threads=args.threads)
    per_prompt, worst, _ = compare(runner, load_golden(os.path.join(args.bundle, GOLDEN_FILE)))
    json.dump({"metrics": worst, "prompts": per_prompt, "runtime": runner.runtime_facts(),
               "device": local_device_facts()}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
