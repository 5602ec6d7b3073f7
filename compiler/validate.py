"""Artifact vs the PyTorch reference (the canonical decoder, adapters merged, fp32): golden data and gates.

The reference's logits and greedy tokens on fixed prompts are computed once (`golden`), stored in the
bundle, and compared with an artifact by `runtimes.validation` (on the build machine or on a device);
the gates turn those metrics into a verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compiler.models.decoder import CanonicalDecoder
from runtimes.base import greedy
from runtimes.validation import compare, log_softmax, logit_metrics

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
    return [log_softmax(torch_logits(model, ids)) for ids in prompts]


def calibration_kl(runner, windows: list[list[int]], reference: list[np.ndarray]) -> float:
    """Mean KL(fp32 || artifact) per token over the calibration windows, each from an empty cache: what
    `--max-kl` is planned for, measured in the artifact's own runtime. reference: torch_logits of each window."""
    kls = []
    for ids, ref in zip(windows, reference):
        logits, _ = runner.forward(np.asarray([ids], dtype=np.int64), runner.empty_cache(), 0)
        kls.append(logit_metrics(ref, np.asarray(logits)[0])["kl_mean"])
    return float(np.mean(kls))


def golden(model: CanonicalDecoder, prompts: list[list[int]], new_tokens: int) -> dict:
    """The reference's logits at every prompt position and its greedy tokens: what an artifact is checked
    against (stored in the bundle as runtimes.validation.GOLDEN_FILE)."""
    return {"prompts": prompts, "logits": [torch_logits(model, ids) for ids in prompts],
            "tokens": [torch_greedy(model, ids, new_tokens) for ids in prompts]}


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


def gate_results(metrics: dict, gates: dict[str, tuple[str, float]]) -> dict:
    """The verdict on an artifact's metrics; gates on metrics it has no value for (LoRA retention without a
    LoRA reference) are left out."""
    results = [GateResult(name, direction, limit, metrics[name]) for name, (direction, limit) in gates.items()
               if name in metrics]
    return {
        "passed": all(g.passed for g in results),
        "metrics": metrics,
        "gates": [g.to_dict() for g in results],
        "failures": [g.explain() for g in results if not g.passed],
        "summary": [g.explain() for g in results],
    }


def validate(runner, golden_data: dict, gates: dict[str, tuple[str, float]], lora_reference: dict | None = None,
             progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """Compare `runner` (a runtimes.base.Runtime) with the reference's golden data, then the gates.
    progress(done, total): prompts compared."""
    per_prompt, worst, artifact_logprobs = compare(runner, golden_data, progress)
    retention = None
    if lora_reference is not None:
        retention = lora_retention(artifact_logprobs, lora_reference)
        worst["lora_delta_retention"] = min([retention["total"], *(a["retention"] for a in retention["per_adapter"])])
    return {**gate_results(worst, gates), "prompts": per_prompt, "new_tokens": len(golden_data["tokens"][0]),
            "lora_retention": retention}
