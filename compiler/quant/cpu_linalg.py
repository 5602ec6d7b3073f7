"""fp32 matrix products (x^T x and Cholesky factors among them) for calibration, on whichever of torch's two
CPU libraries is fast on this processor.

torch sends fp32 matmuls to MKL, which on AMD processors runs its AVX2 code (about 170-190 GFLOP/s on two
Zen 5 cores against 380-430 through oneDNN, also in the torch wheel and reached by
torch.ops.mkldnn._linear_pointwise). On Intel's, MKL is the slightly faster one (docs/measurements.md).
The choice is made per processor vendor, not timed, so that rebuilds on one machine stay identical.
EDGEC_FP32_MATMUL=onednn or =mkl overrides it (measurements, tests).

Products whose rounding only adds noise to a result (GPTQ's error sums, the smoothing check's errors)
run with bf16 operands where the processor multiplies bf16 natively (`use_bf16`).
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


@functools.cache
def use_bf16() -> bool:
    """Whether `linear_bf16` runs in bf16: on processors with bf16 dot products (AVX512-BF16, AMX-BF16), where
    oneDNN multiplies bf16 at about twice its fp32 rate (765 against 350-390 GFLOP/s on two Zen 5 cores);
    elsewhere bf16 would be converted in software, slower than fp32. Chosen by the processor's flags, not
    timed, so that rebuilds on one machine stay identical. EDGEC_CALIBRATION_BF16=0 or =1 overrides it."""
    from runtimes.base import cpu_facts

    wanted = os.environ.get("EDGEC_CALIBRATION_BF16", "")
    native = {"avx512_bf16", "amx_bf16"} & set(cpu_facts()["cpu_features"])
    choice = wanted == "1" if wanted in ("0", "1") else bool(native)
    return choice and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _dense(t: torch.Tensor) -> torch.Tensor:
    # oneDNN takes a contiguous matrix or its transpose; other strides (a slice of columns) send it to a
    # reference kernel about 1000x slower.
    return t if t.is_contiguous() or (t.dim() == 2 and t.T.is_contiguous()) else t.contiguous()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (x @ weight^T + bias) for fp32 CPU tensors."""
    if use_onednn() and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" \
            and not _needs_grad(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(_dense(x), _dense(weight), bias, "none", [], "")
    return F.linear(x, weight, bias)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D fp32 tensors."""
    return linear(a, b.T)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear` with its operands rounded to bf16 (8 bits of mantissa; products summed in fp32, the result
    rounded to bf16 and returned as fp32) where `use_bf16`, else `linear` itself: about 0.3% relative
    error, for products whose errors are noise to their use. Never for Hessians or their factors: a
    relative error of 2^-9 in each entry of H can outweigh GPTQ's 1% damping."""
    operands = [t for t in (x, weight, bias) if t is not None]
    if not use_bf16() or _needs_grad(*operands) \
            or any(t.dtype not in (torch.float32, torch.bfloat16) or t.device.type != "cpu" for t in operands):
        return linear(x, weight, bias)
    low = [None if t is None else _dense(t.to(torch.bfloat16)) for t in (x, weight, bias)]
    return torch.ops.mkldnn._linear_pointwise(*low, "none", [], "").float()


def copy_transposed(dst: torch.Tensor, src: torch.Tensor, tile: int = 64) -> None:
    """dst = src.T, a tile of src's rows at a time: about twice as quick as one strided copy of the whole
    transpose, whose reads or writes miss the cache."""
    for i in range(0, src.shape[0], tile):
        dst[:, i : i + tile] = src[i : i + tile].T


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
        copy_transposed(out[a:b, b:], out[b:, a:b])
    return out


def reverse_cholesky(a: torch.Tensor, block: int = 256) -> torch.Tensor:
    """R, upper triangular, with a = R R^T for SPD `a` (the Cholesky factor of `a` with rows and columns
    reversed, reversed back); `a` may be overwritten. Wide ones as a blocked factor from the last block to
    the first, whose panels and trailing updates are `linear` products: MKL's potrf is slower on both vendors
    (8192 wide: AMD 1.58 s against 0.79 s, its AVX2 code; Intel 1.37 against 0.85 s), and working in place
    spares two reversed copies of `a`."""
    n = a.shape[0]
    if n < 4 * block:
        return torch.linalg.cholesky(a.flip(0, 1)).flip(0, 1)
    edges = [0, *range(n % block or block, n + 1, block)]
    for k0, k1 in reversed(list(zip(edges, edges[1:]))):
        factor = torch.linalg.cholesky(a[k0:k1, k0:k1].flip(0, 1)).flip(0, 1)  # reads a's upper triangle
        a[k0:k1, k0:k1] = factor
        if k0:
            # The panel above: A01 R11^-T, with R11's small inverse, as a product.
            inverse = torch.linalg.solve_triangular(factor, torch.eye(k1 - k0), upper=True)
            panel = linear(a[:k0, k0:k1], inverse)
            a[:k0, k0:k1] = panel
            for j0, j1 in zip(edges, edges[1:]):  # the leading matrix's upper triangle, a block column at a time
                if j0 >= k0:
                    break
                if use_onednn():
                    a[:j1, j0:j1] -= linear(panel[:j1], panel[j0:j1])
                else:  # MKL subtracts in place, into the strided block: no temporary (8192 wide: 0.85 -> 0.80 s)
                    torch.addmm(a[:j1, j0:j1], panel[:j1], panel[j0:j1].T, alpha=-1, out=a[:j1, j0:j1])
    return a.triu_()


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
