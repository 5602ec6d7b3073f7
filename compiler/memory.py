"""A build's memory: the checkpoint's pages handed back once a stage is done with them (release_pages)."""

from __future__ import annotations

import torch
from torch import nn


# madvise(MADV_DONTNEED) and /proc/self/pagemap: Linux only; elsewhere release_pages does nothing.
_MADV_DONTNEED = 4
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61


def release_pages(*arrays) -> int:
    """Hand the kernel back the pages of tensors or arrays that are views of a mapped safetensors file and
    unmodified, so that RSS holds only what a stage still works on; returns the bytes released.

    The checkpoint's fp32 tensors are views of its file (safetensors maps it, copy-on-write): read pages
    stay resident after a stage has converted them. Dropped clean pages read back from the file, the
    same bytes, if touched again. A page written since (a LoRA merge in place) is private memory that
    dropping would lose: a range with any such page, or any page not from a file, is left alone."""
    import mmap

    import numpy as np

    page = mmap.PAGESIZE
    released = 0
    try:
        pagemap = open("/proc/self/pagemap", "rb")
    except OSError:
        return 0
    with pagemap:
        libc = _libc()
        seen = set()
        for a in arrays:
            start, nbytes = _span(a)
            first, last = -(-start // page), (start + nbytes) // page  # whole pages inside the array only
            if last <= first or first in seen:
                continue
            seen.add(first)
            pagemap.seek(first * 8)
            entries = np.frombuffer(pagemap.read((last - first) * 8), dtype=np.uint64)
            present = (entries & np.uint64(_PRESENT)) != 0
            from_file = (entries & np.uint64(_FILE)) != 0
            if not present.any() or (present & ~from_file).any() or ((entries & np.uint64(_SWAPPED)) != 0).any():
                continue
            if libc.madvise(first * page, (last - first) * page, _MADV_DONTNEED) == 0:
                released += int(present.sum()) * page
    return released


def release_module_pages(module: nn.Module) -> int:
    """release_pages for every parameter and buffer of a module."""
    return release_pages(*module.parameters(), *module.buffers())


def _span(a) -> tuple[int, int]:
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu" or a.is_sparse or type(a) not in (torch.Tensor, nn.Parameter) or not a.is_contiguous():
            return 0, 0
        return a.data_ptr(), a.numel() * a.element_size()
    interface = getattr(a, "__array_interface__", None)
    if interface is None or not (a.flags.c_contiguous or a.flags.f_contiguous):
        return 0, 0
    return interface["data"][0], a.nbytes


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC
