"""Block-wise int4/int8 weight arithmetic in the layout of onnxruntime's MatMulNBits and GatherBlockQuantized.

Blocks run along the input dimension K of a weight [N, K], one scale (and, asymmetric, one zero point) per
block. Symmetric blocks map the signed absolute maximum to -2^(bits-1), as onnxruntime's MLAS does, so
`rtn` here equals onnxruntime's (and the GenAI builder's) rounding. `clip` searches, per block, the
clipping ratio of the range that minimises the block's squared reconstruction error.

The `xnnpack` grid is the symmetric one ExecuTorch's XNNPACK int4 linear can hold: it refuses negative
scales (so the signed maximum cannot always land on -2^(bits-1)) and stores them as bfloat16, so the
scale is the smallest positive one covering [min, max] with codes -2^(bits-1)..2^(bits-1)-1, rounded up
to bfloat16 (rounding up keeps the range covered).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

CLIP_RATIOS = np.linspace(1.0, 0.6, 17, dtype=np.float32)


GRIDS = ("onnx", "xnnpack")


def absolute_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x.abs().amax(dim) without x.abs()'s full-size temporary (3.5x quicker on a 1B gate_proj), the same
    values (+ 0.0: an all-zero slice gives +0.0, as abs() does)."""
    return torch.maximum(x.amax(dim), -x.amin(dim)) + 0.0


def block_scales_and_zeros(blocks: torch.Tensor, bits: int, symmetric: bool, ratio: float = 1.0,
                           grid: str = "onnx", dim: int = -1):
    """Per-block scale and zero point (fp32) for fp32 blocks laid along `dim` ([N, nb, bs] by default; GPTQ's
    column blocks [B, bs, N] along 1), from each block's min and max; `ratio` scales the range (clip)."""
    half = 2 ** (bits - 1)
    hi, lo = blocks.amax(dim), blocks.amin(dim)
    if grid == "xnnpack":
        # + 0.0: an all-zero block's maximum(-0.0, 0.0) comes out -0.0 on torch's scalar path
        scale = (torch.maximum(-torch.clamp(lo, max=0.0) / half, torch.clamp(hi, min=0.0) / (half - 1)) + 0.0) * ratio
        return _bfloat16_ceil(scale), torch.full_like(scale, half)
    if symmetric:
        # Signed absolute maximum mapped to -half, as onnxruntime's MLAS does: the full range is used. A block
        # holding both +m and -m takes the first of them in order, as MLAS's scan (and numpy's argmax) does.
        signed_max = torch.where(hi >= -lo, hi, lo)
        tied = hi == -lo
        if tied.any():
            first = blocks.gather(dim, blocks.abs().argmax(dim, keepdim=True)).squeeze(dim)
            signed_max = torch.where(tied, first, signed_max)
        scale = signed_max * ratio / -half
        return scale, torch.full_like(scale, half)
    lo, hi = torch.clamp(lo, max=0.0) * ratio, torch.clamp(hi, min=0.0) * ratio
    scale = (hi - lo) / (2**bits - 1)
    zero = torch.clamp(torch.round(-lo / torch.where(scale == 0, 1.0, scale)), 0, 2**bits - 1)
    return scale, zero + 0.0  # + 0.0: no -0.0 zero points


def rtn_dequantized(w: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """w [N, K] rounded to nearest on the symmetric onnx grid at `block` and dequantized, in torch: what
    quantize_blocks(..., "rtn") and dequantize_blocks give."""
    n, k = w.shape
    blocks = torch.nn.functional.pad(w.float(), (0, -k % block)).reshape(n, -1, block)
    scale, zero = block_scales_and_zeros(blocks, bits, True)
    scale, zero = scale[..., None], zero[..., None]
    q = torch.clamp(torch.round(blocks / torch.where(scale == 0, 1.0, scale)) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(n, -1)[:, :k]


def _bfloat16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Non-negative fp32 values rounded up to the nearest bfloat16 (the upper 16 bits of fp32)."""
    bits = x.contiguous().view(torch.int32)
    up = (bits & 0xFFFF) != 0
    return ((bits & ~0xFFFF) + up.to(torch.int32) * 0x10000).view(torch.float32)


def _quantize(blocks, scale, zero, bits):
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    return np.clip(np.round(blocks / safe) + zero[..., None], 0, 2**bits - 1)


ROWS_PER_CHUNK = 2048  # bounds the float temporaries to a few MB whatever the matrix size
PARALLEL_FROM = 1 << 20  # weights; smaller matrices are quicker than a thread pool's start


def quantize_blocks(w_nk: np.ndarray, bits: int, block_size: int, symmetric: bool, algo: str):
    """w_nk [N, K] fp32 -> (q uint8 [N, nb, bs], scales [N, nb], zero points uint8 [N, nb])."""
    n, k = w_nk.shape
    threads = os.cpu_count() or 1
    if threads == 1 or n * k < PARALLEL_FROM:
        return _quantize_rows(w_nk, bits, block_size, symmetric, algo)
    # numpy lets go of the GIL inside its loops, so chunks in threads use every core; each row's result is
    # the same whichever thread computes it.
    rows = min(ROWS_PER_CHUNK, -(-n // threads))
    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(lambda i: _quantize_rows(w_nk[i : i + rows], bits, block_size, symmetric, algo),
                              range(0, n, rows)))
    return tuple(np.concatenate(p, axis=0) for p in zip(*parts))


def _block_scales_np(blocks: np.ndarray, bits: int, symmetric: bool, ratio: float = 1.0):
    scale, zero = block_scales_and_zeros(torch.from_numpy(blocks), bits, symmetric, ratio)
    return scale.numpy(), zero.numpy()


def _quantize_rows(w_nk: np.ndarray, bits: int, block_size: int, symmetric: bool, algo: str):
    n, k = w_nk.shape
    nb = -(-k // block_size)
    padded = np.zeros((n, nb * block_size), dtype=np.float32)
    padded[:, :k] = w_nk
    blocks = padded.reshape(n, nb, block_size)
    scale, zero = _block_scales_np(blocks, bits, symmetric)
    q = _quantize(blocks, scale, zero, bits)
    if algo == "clip":
        best = ((q - zero[..., None]) * scale[..., None] - blocks) ** 2
        best = best.sum(axis=-1)
        for ratio in CLIP_RATIOS[1:]:
            s, z = _block_scales_np(blocks, bits, symmetric, float(ratio))
            candidate = _quantize(blocks, s, z, bits)
            err = (((candidate - z[..., None]) * s[..., None] - blocks) ** 2).sum(axis=-1)
            better = err < best
            best = np.where(better, err, best)
            scale = np.where(better, s, scale)
            zero = np.where(better, z, zero)
            q = np.where(better[..., None], candidate, q)
    return q.astype(np.uint8), scale, zero.astype(np.uint8)


def largest_dividing_block(k: int, block_size: int) -> int:
    """The largest power-of-two fraction of `block_size` (at least 16) that divides K; 0 when none does.
    Where a padded last block will not do: a table shared by the embedding gather and the lm_head (the
    gather would return the padding as part of the row), torchao's per-group quantization."""
    block = block_size
    while block >= 16 and k % block:
        block //= 2
    return block if block >= 16 else 0


def dequantize_blocks(q, scale, zero, k: int) -> np.ndarray:
    w = (q.astype(np.float32) - zero[..., None].astype(np.float32)) * scale[..., None]
    return w.reshape(q.shape[0], -1)[:, :k]


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Two 4-bit values per byte, low nibble first, along the last axis (8 bits: as is)."""
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
