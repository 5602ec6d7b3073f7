"""GPTQ: calibration-based int4 rounding that compensates each column's error on the columns after it.

For every Linear of the merged fp32 decoder, the Hessian proxy H = 2/n * sum(x x^T) of its inputs on
calibration text is collected with forward hooks (one fp32 pass; q/k/v and gate/up share their input and
so their H). Each weight [N, K] is then quantized column by column in the exact block format of
QuantizeWeightsPass (one scale per `block_size` columns, set when the block starts, from the weights as
updated so far), and each column's rounding error is spread over the remaining columns through the
Cholesky factor of H^-1 (Frantar et al., 2022). The result is handed to the pass as precomputed blocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from compiler.errors import UsageError
from compiler.models.decoder import CanonicalDecoder
from compiler.quant.blocks import block_scales_and_zeros

BUILTIN_CALIBRATION = (
    "The quick brown fox jumps over the lazy dog. Small language models run on phones, single-board "
    "computers and laptops. A compiler turns a trained network into a file that an application loads; "
    "it must keep what the network computes while making it smaller and faster. "
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    "Once upon a time, a curious child asked why the sky is blue. Sunlight is scattered by the air, and "
    "blue light, with its shorter wavelength, is scattered the most. "
    "Ingredients: two cups of flour, one egg, a pinch of salt. Mix, rest for an hour, then bake. "
    "The meeting is moved to Thursday at three; please bring the quarterly figures and the draft plan. "
)


def calibration_sequences(model_dir: Path, text_file: str | None, vocab_size: int, length: int = 128,
                          count: int = 32) -> list[list[int]]:
    """Calibration text through the model's tokenizer, cut into up to `count` windows of `length` tokens."""
    from tokenizers import Tokenizer

    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.exists():
        raise UsageError(f"{model_dir}: --algo gptq needs tokenizer.json to tokenize the calibration text")
    text = Path(text_file).read_text(errors="replace") if text_file else BUILTIN_CALIBRATION * 8
    ids = [i for i in Tokenizer.from_file(str(tokenizer_path)).encode(text).ids if i < vocab_size]
    if len(ids) < length:
        raise UsageError(f"{text_file or 'built-in calibration text'}: only {len(ids)} tokens; give at least {length}")
    step = max(length, (len(ids) - length) // count)
    return [ids[s : s + length] for s in range(0, len(ids) - length + 1, step)][:count]


def collect_hessians(model: CanonicalDecoder, sequences: list[list[int]], only: set[str] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Module path -> H [K, K] for every nn.Linear (or those in `only`), from one fp32 pass over the sequences."""
    hessians: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def accumulate(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            n = x.shape[0]
            total = counts.get(name, 0) + n
            h = hessians.get(name)
            update = x.T @ x
            hessians[name] = update * (2 / total) if h is None else h * (counts[name] / total) + update * (2 / total)
            counts[name] = total
        return accumulate

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (only is None or name in only):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            # Equal-length windows in small batches: larger matmuls, bounded logits memory.
            for i in range(0, len(sequences), 4):
                x = torch.tensor(sequences[i : i + 4])
                positions = torch.arange(x.shape[1])[None].expand_as(x)
                model(x, torch.ones_like(x), positions, *model.empty_cache(x.shape[0]))
    finally:
        for h in hooks:
            h.remove()
    return hessians


def _group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of one block of columns, by the same rule as the RTN path."""
    scale, zero = block_scales_and_zeros(w.numpy()[:, None, :], bits, symmetric)
    return torch.from_numpy(scale[:, 0]), torch.from_numpy(zero[:, 0])


GPTQ_ROWS_PER_CHUNK = 4096  # rows are independent given H: chunks bound the memory of a large lm_head


def _inverse_hessian_factor(hessian: torch.Tensor, k: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of H^-1 for H padded to k columns, and the mask of dead (all-zero) inputs."""
    k_real = hessian.shape[0]
    h = torch.zeros(k, k)
    h[:k_real, :k_real] = hessian
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True), dead


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int, symmetric: bool,
                  damp: float = 0.01, lazy: int = 128):
    """weight [N, K] -> (q uint8 [N, nb, bs], scales [N, nb], zero points uint8 [N, nb]) as numpy."""
    n, k_real = weight.shape
    nb = -(-k_real // block_size)
    # K is padded to whole blocks with zero columns (as the RTN path does); their H diagonal is 0, so
    # they count as dead inputs and stay exactly zero.
    hinv, dead = _inverse_hessian_factor(hessian, nb * block_size, damp)
    parts = [_gptq_rows(weight[r : r + GPTQ_ROWS_PER_CHUNK], hinv, dead, bits, block_size, symmetric, lazy)
             for r in range(0, n, GPTQ_ROWS_PER_CHUNK)]
    return tuple(np.concatenate(p, axis=0) for p in zip(*parts))


def _gptq_rows(weight, hinv, dead, bits, block_size, symmetric, lazy):
    n, k_real = weight.shape
    k = hinv.shape[0]
    nb = k // block_size
    w = torch.zeros(n, k)
    w[:, :k_real] = weight.detach().float()
    w[:, dead] = 0
    q_all = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, nb)
    zeros = torch.zeros(n, nb)
    lazy = max(block_size, lazy - lazy % block_size)
    qmax = 2**bits - 1
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block_size == 0:
                scale, zero = _group_params(w1[:, i : i + block_size], bits, symmetric)
                scales[:, col // block_size], zeros[:, col // block_size] = scale, zero
                safe = torch.where(scale == 0, 1.0, scale)
            q = torch.clamp(torch.round(w1[:, i] / safe) + zero, 0, qmax)
            q_all[:, col] = q.to(torch.uint8)
            dq = (q - zero) * scale
            err = (w1[:, i] - dq) / hinv1[i, i]
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return (q_all.reshape(n, nb, block_size).numpy(), scales.numpy().astype(np.float32),
            zeros.numpy().astype(np.uint8))


# Linears that read the same input share one Hessian, and GPTQ treats rows independently given H, so
# they are quantized as one stacked matrix: one column loop instead of three (q/k/v) or two (gate/up).
SHARED_INPUT = {"q_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj")}
FOLLOWERS = {"k_proj", "v_proj", "up_proj"}


def gptq_blocks(model: CanonicalDecoder, sequences: list[list[int]], bits: int, block_size: int,
                symmetric: bool, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Module path -> precomputed blocks for every Linear (those named in `skip` excepted)."""
    modules = dict(model.named_modules())
    leaders = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in FOLLOWERS]
    hessians = collect_hessians(model, sequences, only=set(leaders))
    out = {}
    for name, h in hessians.items():
        prefix, _, leaf = name.rpartition(".")
        group = [f"{prefix}.{m}" if prefix else m for m in SHARED_INPUT.get(leaf, (leaf,))]
        weights = [modules[g].weight for g in group]
        if name in skip:
            continue
        q, scales, zeros = gptq_quantize(torch.cat(weights, dim=0), h, bits, block_size, symmetric)
        start = 0
        for member, weight in zip(group, weights):
            rows = slice(start, start + weight.shape[0])
            out[member] = (q[rows], scales[rows], zeros[rows])
            start += weight.shape[0]
    return out
