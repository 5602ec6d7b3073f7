"""edgec's kernels for ExecuTorch on x86-64 (executorch_kernels.cpp), built once per machine.

The x86 executorch wheel's `llama::custom_sdpa` is compiled for baseline x86-64 and computes its softmax's
exp one lane at a time; edgec's attention (AVX2 and FMA) registers for float programs ahead of it, as do
edgec's slice_copy and update_cache (the copies around it, on the thread pool), so a `.pte` run by edgec's
runtime on an x86 host gets them. The program is unchanged: a phone or any other ExecuTorch runtime runs
the stock kernels. Compiled with the host's g++ against the wheel's own headers into the edgec cache,
keyed by the source, the executorch version, the compiler and its flags; where anything is missing (not
x86-64 Linux, no compiler, no AVX2) the stock kernels run and `status()` says why.

EDGEC_EXECUTORCH_KERNELS=stock turns them off (to compare, or where a build misbehaves).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from runtimes.base import cpu_facts

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("executorch_kernels.cpp")
OFF_SWITCH = "EDGEC_EXECUTORCH_KERNELS"

_library: ctypes.CDLL | None = None
_status: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEC_CACHE", Path.home() / ".cache" / "edgec")) / "kernels"


def _executorch_dirs() -> tuple[Path, Path]:
    from executorch import version  # executorch is a namespace package: no __file__ of its own

    root = Path(version.__file__).resolve().parent
    return root / "include", root / "lib"


def _build(compiler: str, include: Path, lib: Path) -> Path:
    """The shared library for this source, executorch, compiler and flags, compiled unless the cache has it."""
    from executorch import version as et_version

    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-DET_USE_THREADPOOL", "-DET_EVENT_TRACER_ENABLED",
             "-DC10_USING_CUSTOM_GENERATED_MACROS", f"-I{include}",
             f"-I{include / 'executorch/runtime/core/portable_type/c10'}", f"-L{lib}", "-lexecutorch",
             "-lexecutorch_threadpool", f"-Wl,-rpath,{lib}"]
    compiler_version = subprocess.run([compiler, "-dumpfullversion"], capture_output=True, text=True).stdout
    key_parts = [SOURCE.read_bytes(), getattr(et_version, "__version__", "").encode(), compiler_version.encode(),
                 "\0".join(flags).encode()]
    key = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:16]
    target = cache_dir() / f"executorch-kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed into place: processes building at once each finish whole.
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    command = [compiler, str(SOURCE), "-o", partial, *flags]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load() -> str:
    """Registers the kernels in this process (once; after the stock custom ops are loaded) and returns
    `status()`. Never raises: any failure leaves the stock kernels in place."""
    global _library, _status
    if _status is not None:
        return _status
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if os.environ.get(OFF_SWITCH, "").lower() == "stock":
        _status = f"stock ({OFF_SWITCH}=stock)"
    elif platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        _status = "stock (edgec's kernels are for x86-64 Linux)"
    elif not {"avx2", "fma"} <= set(cpu_facts()["cpu_features"]):
        _status = "stock (no AVX2/FMA)"
    elif not SOURCE.exists():
        _status = "stock (kernels' source not shipped)"
    elif compiler is None:
        _status = "stock (no C++ compiler: install g++)"
    else:
        include, lib = _executorch_dirs()
        try:
            _library = ctypes.CDLL(str(_build(compiler, include, lib)), mode=ctypes.RTLD_GLOBAL)
            _library.edgec_calls_served.restype = ctypes.c_int64
            _library.edgec_calls_served.argtypes = [ctypes.c_int]
            _status = "edgec avx2"
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            log.warning("edgec's ExecuTorch kernels did not build (%s): the stock kernels run", err)
            _status = f"stock (build failed: {err})"
    return _status


def status() -> str | None:
    """`edgec avx2`, or `stock (why)`; None before `load()`."""
    return _status


KERNELS = ("attention", "slice_copy", "update_cache")


def calls_served(kernel: str = "attention") -> int:
    """Calls of this op that edgec's kernel computed in this process (0 without it): the others went to the
    stock kernel (for attention: a mask, other dtypes or head sizes)."""
    return int(_library.edgec_calls_served(KERNELS.index(kernel))) if _library is not None else 0
