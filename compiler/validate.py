"""Artifact vs the PyTorch reference (the canonical decoder, adapters merged, fp32): metrics and gates.

Metrics per fixed prompt: all-position and last-position logits max-abs error, relative L2 error, top-1
agreement, KL divergence of the artifact's distribution from the reference's, and greedy generation of N
tokens with the position of the first divergence. The artifact's prompt logits come from two chunks (a
prefill and a continuation on the KV cache), so the cache path is checked as well as the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compiler.models.decoder import CanonicalDecoder
from runtimes.base import greedy

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little robot",
    "edgec compiles a fine-tuned language model for a phone",
)
SYNTHETIC_PROMPT_LENGTHS = (8, 17, 32)


def prompt_ids(bundle_dir: Path, vocab_size: int, bos_token_id: int | None) -> list[list[int]]:
    """Fixed prompts: the default texts through the bundle's tokenizer, else fixed pseudo-random ids."""
    tokenizer_path = bundle_dir / "tokenizer.json"
    prompts = []
    if tokenizer_path.exists():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        for text in DEFAULT_PROMPTS:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            if bos_token_id is not None and 0 <= bos_token_id < vocab_size:
                ids = [bos_token_id, *ids]
            if len(ids) >= 4 and max(ids) < vocab_size:
                prompts.append(ids)
    if len(prompts) == len(DEFAULT_PROMPTS):
        return prompts
    rng = np.random.default_rng(1234)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in SYNTHETIC_PROMPT_LENGTHS]


def torch_logits(model: CanonicalDecoder, ids: list[int]) -> np.ndarray:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(x, torch.ones_like(x), torch.arange(len(ids))[None], *model.empty_cache())
    return out[0][0].numpy()


def torch_step(model: CanonicalDecoder):
    """The reference's step for `runtimes.base.greedy`: (ids [1, seq], start) -> last-position logits."""
    cache = model.empty_cache()

    def step(ids: np.ndarray, start: int) -> np.ndarray:
        nonlocal cache
        x = torch.from_numpy(ids)
        with torch.no_grad():
            logits, *cache = model(x, torch.ones(1, start + x.shape[1], dtype=torch.long),
                                   torch.arange(start, start + x.shape[1])[None], *cache)
        return logits[0, -1].numpy()

    return step


def torch_greedy(model: CanonicalDecoder, ids: list[int], new_tokens: int) -> list[int]:
    return greedy(torch_step(model), ids, new_tokens)


def torch_logprobs(model: CanonicalDecoder, prompts: list[list[int]]) -> list[np.ndarray]:
    return [_log_softmax(torch_logits(model, ids)) for ids in prompts]


def lora_retention(artifact: list[np.ndarray], reference: dict) -> dict:
    """How much of what the adapters changed survives in the artifact, on log-probabilities.

    total: <A - B, M - B> / |M - B|^2 over all prompt positions (A artifact, B base, M merged reference);
    1.0 keeps the whole change, 0.0 loses it. Per adapter: the artifact's change projected on that
    adapter's own change (its merged-after minus merged-before reference). rel_error: |A - M| / |M - B|.
    """
    base, merged = reference["base"], reference["merged"]
    a_minus_b = np.concatenate([(a - b).ravel() for a, b in zip(artifact, base)])
    m_minus_b = np.concatenate([(m - b).ravel() for m, b in zip(merged, base)])
    a_minus_m = np.concatenate([(a - m).ravel() for a, m in zip(artifact, merged)])
    denom = float(m_minus_b @ m_minus_b) or 1e-30
    per_adapter = []
    for adapter in reference["adapters"]:
        delta = np.concatenate([d.ravel() for d in adapter["delta"]])
        per_adapter.append({"path": adapter["path"],
                            "retention": float(a_minus_b @ delta / (float(delta @ delta) or 1e-30))})
    return {"total": float(a_minus_b @ m_minus_b / denom),
            "rel_error": float(np.linalg.norm(a_minus_m) / np.sqrt(denom)),
            "per_adapter": per_adapter}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logit_metrics(reference: np.ndarray, artifact: np.ndarray) -> dict:
    """Metrics over [positions, vocab] logits."""
    diff = np.abs(artifact.astype(np.float64) - reference.astype(np.float64))
    log_p, log_q = _log_softmax(reference), _log_softmax(artifact)
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


def next_token_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] given the logits at the positions before them."""
    log_p = _log_softmax(logits[:-1])
    return float(-log_p[np.arange(len(ids) - 1), ids[1:]].mean())


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class GateResult:
    metric: str
    direction: str
    limit: float
    value: float

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.direction == "max" else self.value >= self.limit

    def explain(self) -> str:
        relation = "at most" if self.direction == "max" else "at least"
        if self.passed:
            return f"{self.metric} = {self.value:.3g} ({relation} {self.limit:.3g})"
        if self.direction == "max":
            by = f"{self.value / self.limit:.3g}x the limit" if self.limit else f"by {self.value:.3g}"
        else:
            by = f"short by {self.limit - self.value:.3g}"
        return f"{self.metric} = {self.value:.3g}, must be {relation} {self.limit:.3g} ({by})"

    def to_dict(self) -> dict:
        return {"metric": self.metric, "direction": self.direction, "limit": self.limit,
                "value": self.value, "passed": self.passed}


def validate(runner, reference: CanonicalDecoder, prompts: list[list[int]], new_tokens: int,
             gates: dict[str, tuple[str, float]], lora_reference: dict | None = None) -> dict:
    """Compare `runner` (an artifact runtime with `forward`, `empty_cache`, `generate`) with the reference."""
    per_prompt = []
    artifact_logprobs = []
    for ids in prompts:
        ref = torch_logits(reference, ids)
        split = max(1, len(ids) // 2)
        head, cache = runner.forward(np.asarray([ids[:split]], dtype=np.int64), runner.empty_cache(), 0)
        tail, _ = runner.forward(np.asarray([ids[split:]], dtype=np.int64), cache, split)
        art = np.concatenate([head[0], tail[0]], axis=0)
        artifact_logprobs.append(_log_softmax(art))
        metrics = logit_metrics(ref, art)
        metrics["nll_reference"], metrics["nll_artifact"] = next_token_nll(ref, ids), next_token_nll(art, ids)
        ref_tokens = torch_greedy(reference, ids, new_tokens)
        art_tokens = runner.generate(ids, new_tokens)
        divergence = first_divergence(ref_tokens, art_tokens)
        metrics.update(
            prompt_tokens=len(ids),
            greedy_tokens=len(ref_tokens),
            greedy_first_divergence=divergence,
            greedy_match=1.0 if divergence is None else divergence / len(ref_tokens),
        )
        per_prompt.append(metrics)

    worst = {}
    for key in ("max_abs_logits", "max_abs_last_logits", "rel_l2_logits", "rel_l2_last_logits", "kl_mean", "kl_max"):
        worst[key] = max(p[key] for p in per_prompt)
    for key in ("top1_agreement", "greedy_match"):
        worst[key] = min(p[key] for p in per_prompt)
    # Perplexity of the prompts themselves (mean next-token NLL over all prompts), reference vs artifact.
    tokens = sum(len(ids) - 1 for ids in prompts)
    nll_ref = sum(p["nll_reference"] * (len(ids) - 1) for p, ids in zip(per_prompt, prompts)) / tokens
    nll_art = sum(p["nll_artifact"] * (len(ids) - 1) for p, ids in zip(per_prompt, prompts)) / tokens
    worst["perplexity_reference"] = float(np.exp(nll_ref))
    worst["perplexity_artifact"] = float(np.exp(nll_art))
    worst["perplexity_ratio"] = float(np.exp(nll_art - nll_ref))
    retention = None
    if lora_reference is not None:
        retention = lora_retention(artifact_logprobs, lora_reference)
        worst["lora_delta_retention"] = min([retention["total"], *(a["retention"] for a in retention["per_adapter"])])
    else:
        gates = {k: v for k, v in gates.items() if not k.startswith("lora_")}
    results = [GateResult(name, direction, limit, worst[name]) for name, (direction, limit) in gates.items()]
    return {
        "passed": all(g.passed for g in results),
        "metrics": worst,
        "gates": [g.to_dict() for g in results],
        "failures": [g.explain() for g in results if not g.passed],
        "summary": [g.explain() for g in results],
        "prompts": per_prompt,
        "new_tokens": new_tokens,
        "lora_retention": retention,
    }
