"""fp32 matrix products (x^T x and Cholesky factors among them) for calibration, on whichever of torch's two
CPU libraries is fast on this processor.

torch sends fp32 matmuls to MKL, which on AMD processors runs its AVX2 code (about 170-190 GFLOP/s on two
Zen 5 cores against 380-430 through oneDNN, also in the torch wheel and reached by
torch.ops.mkldnn._linear_pointwise). On Intel's, MKL is the slightly faster one (docs/measurements.md).
The choice is made per processor vendor, not timed, so that rebuilds on one machine stay identical.
EDGEC_FP32_MATMUL=onednn or =mkl overrides it (measurements, tests).
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


@functools.cache
def use_onednn() -> bool:
    wanted = os.environ.get("EDGEC_FP32_MATMUL", "").lower()
    if wanted in ("mkl", "onednn"):
        choice = wanted == "onednn"
    else:
        try:
            with open("/proc/cpuinfo") as f:
                choice = any(line.startswith("vendor_id") and ("AuthenticAMD" in line or "HygonGenuine" in line)
                             for line in f)
        except OSError:
            choice = False
    return choice and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _dense(t: torch.Tensor) -> torch.Tensor:
    # oneDNN takes a contiguous matrix or its transpose; other strides (a slice of columns) send it to a
    # reference kernel about 1000x slower.
    return t if t.is_contiguous() or (t.dim() == 2 and t.T.is_contiguous()) else t.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (x @ weight^T + bias) for fp32 CPU tensors."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if use_onednn() and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and not needs_grad:
        return torch.ops.mkldnn._linear_pointwise(_dense(x), _dense(weight), bias, "none", [], "")
    return F.linear(x, weight, bias)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D fp32 tensors."""
    return linear(a, b.T)


def gram(x: torch.Tensor, block: int = 512) -> torch.Tensor:
    """x^T x from the blocks on and below its diagonal, mirrored: about half a full product's work
    (torch has no symmetric rank-k update, and down_proj's 8192-wide Hessians cost a full forward)."""
    k = x.shape[1]
    if k < 2 * block:
        return matmul(x.T, x)
    out = torch.empty(k, k, dtype=x.dtype)
    # oneDNN wants the blocks' rows of x^T contiguous; MKL takes the strided views and writes in place.
    xt = x.T.contiguous() if use_onednn() else None
    for a in range(0, k, block):
        b = min(a + block, k)
        if xt is None:
            torch.mm(x[:, a:].T, x[:, a:b], out=out[a:, a:b])
        else:
            out[a:, a:b] = linear(xt[a:], xt[a:b])
        out[a:b, b:] = out[b:, a:b].T
    return out


def cholesky(a: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The lower Cholesky factor of SPD `a`, which it may overwrite. With oneDNN, a blocked factor whose
    panels and trailing updates are its products: MKL's potrf runs at its AVX2 rate there (8192 wide: 1.58 s
    against 0.79 s)."""
    n = a.shape[0]
    if not use_onednn() or n < 4 * block:
        return torch.linalg.cholesky(a)
    for k0 in range(0, n, block):  # in place
        k1 = min(k0 + block, n)
        factor = torch.linalg.cholesky(a[k0:k1, k0:k1])
        a[k0:k1, k0:k1] = factor
        if k1 < n:
            # The panel below: A21 L11^-T, with L11's small inverse, as a product.
            inverse = torch.linalg.solve_triangular(factor, torch.eye(k1 - k0), upper=False)
            panel = linear(a[k1:, k0:k1], inverse)
            a[k1:, k0:k1] = panel
            for j0 in range(k1, n, block):  # the trailing matrix's lower triangle, a block column at a time
                j1 = min(j0 + block, n)
                a[j0:, j0:j1] -= linear(panel[j0 - k1 :], panel[j0 - k1 : j1 - k1])
    return a.tril_()


class _Linears(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            named = kwargs or {}
            return linear(*args, *(named[k] for k in ("input", "weight", "bias")[len(args):] if k in named))
        return func(*args, **(kwargs or {}))


@contextmanager
def fast_linears():
    """Every F.linear inside (nn.Linear's forward among them) through `linear`."""
    if not use_onednn():
        yield
        return
    with _Linears():
        yield
