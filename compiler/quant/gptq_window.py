"""GPTQ's innermost step compiled: the columns of one lazy window rounded one after another, each column's
error added to the window's later columns at once.

In torch this was seven calls per column on [B, N] slices (246k columns at 1B), which cost their dispatch,
not their arithmetic (about 57 us a column). Compiled with numba, the window is one call; the products
between windows stay in torch (oneDNN's rate on both cores beats a compiled loop on one). numba, not a C
extension of our own: it is a wheel on PyPI for every platform torch's CPU wheel has, and caches the
compiled code (`cache=True`, in __pycache__ or the user's cache directory), so a build compiles it once.

Plain IEEE arithmetic in a fixed order (no fastmath): the same inputs give the same codes on any x86 CPU.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, error_model="numpy")
def round_window(w, shift, feedback, factor_of, i1, i2, o1, scale, zero, inv_scale, zero_scaled, qmax,
                 q_rows, errors, history_bf16, history_fp32):
    """Rounds columns i1:i2 of every matrix of the batch.

    w [B, K, N]: the original weights by columns; shift [B, G, N]: what earlier columns' errors add to the
    group's columns (group starting at column o1, so column c is shift[:, c - o1]); feedback [U, K, K], matrix
    b's being feedback[factor_of[b]];
    scale, zero, inv_scale, zero_scaled [B, N]: the block's grid; qmax: the largest code.
    Writes the codes into q_rows [B, N, K] (by rows, as the blocks are stored), the errors w - (q - zero) *
    scale into errors [B, G, N] (like shift) and into the history of every column's errors: history_bf16
    (uint16 [B, K, N], the bits of bf16 rounded to nearest even, as torch converts) when it has K columns,
    else history_fp32."""
    batch, _, n = w.shape
    width = i2 - i1
    low = np.float32(0)
    in_bf16 = history_bf16.shape[1] == w.shape[1]
    codes = np.empty((width, n), np.uint8)
    start = np.empty((width, n), np.float32)
    for b in range(batch):
        u = factor_of[b]
        for i in range(width):
            for r in range(n):
                start[i, r] = w[b, i1 + i, r] + shift[b, i1 - o1 + i, r]
        for i in range(width):
            c = i1 + i
            g = c - o1
            for r in range(n):
                q = min(max(np.rint(start[i, r] * inv_scale[b, r]) + zero[b, r], low), qmax)
                codes[i, r] = np.uint8(q)
                errors[b, g, r] = (w[b, c, r] + zero_scaled[b, r]) - q * scale[b, r]
            for j in range(i + 1, width):
                f = feedback[u, c, i1 + j]
                for r in range(n):
                    start[j, r] += f * errors[b, g, r]
        for r in range(n):
            for i in range(width):
                q_rows[b, r, i1 + i] = codes[i, r]
        for i in range(width):
            g = i1 + i - o1
            if in_bf16:
                bits = errors[b, g].view(np.uint32)
                for r in range(n):
                    x = bits[r]
                    history_bf16[b, i1 + i, r] = np.uint16((x + np.uint32(0x7FFF) + ((x >> 16) & np.uint32(1))) >> 16)
            else:
                for r in range(n):
                    history_fp32[b, i1 + i, r] = errors[b, g, r]
