"""The bundle directory: model files, tokenizer, generation config, manifest.json; written atomically.

A build writes into a hidden staging directory beside the output and renames it into place only after
manifest.json (written last) is complete, so an interrupted build never leaves a directory that looks like
a bundle. A directory that is not an edgec bundle is never deleted: with --force it is moved aside.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

from compiler import __version__
from compiler.errors import UsageError
from runtimes.base import cpu_facts, sha256_file

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "edgec-bundle"
MANIFEST_SCHEMA_VERSION = 1


# What picks the kernels, and so the last bits of the floats, of a build besides the CPU itself.
DISPATCH_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "EDGEC_FP32_MATMUL", "EDGEC_CALIBRATION_BF16", "ONEDNN_MAX_CPU_ISA")
BUILD_LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "executorch", "torchao", "transformers",
                   "peft", "safetensors", "numpy")


def build_machine() -> dict:
    """The machine a build ran on, as far as it decides the bundle's bytes: builds on one machine with the
    same library versions are byte-identical; on another CPU, float results (GPTQ's scales, say) may differ
    in the last bit, and this says why two bundles differ."""
    import torch

    from compiler.quant.cpu_linalg import use_bf16, use_onednn

    return {"arch": platform.machine(), **cpu_facts(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "calibration_matmul": "onednn" if use_onednn() else "mkl",
            "calibration_bf16": use_bf16(),
            "dispatch_env": {name: os.environ[name] for name in DISPATCH_ENV if name in os.environ},
            "libraries": library_versions()}


def library_versions() -> dict[str, str | None]:
    """The installed version of each library that decides a build's bytes (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: installed(name) for name in BUILD_LIBRARIES}


def is_bundle(directory: Path) -> bool:
    try:
        return json.loads((directory / MANIFEST).read_text()).get("format") == BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(directory: Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: bundle directory does not exist")
    if not is_bundle(directory):
        raise UsageError(f"{directory}: not an edgec bundle (no valid {MANIFEST}); build one with `edgec build`")
    return json.loads((directory / MANIFEST).read_text())


def write_manifest(directory: Path, manifest: dict) -> None:
    """Replace directory/manifest.json atomically: readers see the old manifest or the new, never half."""
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST)


def check_output(out: Path, force: bool) -> None:
    """Refuse, before any work, an output that holds something other than an edgec bundle."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is a file; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_bundle(out) and not force:
        raise UsageError(
            f"{out}: exists and is not an edgec bundle; choose another --out or pass --force (it is moved aside, not deleted)"
        )


def file_entries(directory: Path) -> dict[str, dict]:
    """Every file of the bundle but the manifest, by path relative to it ('adapters/a.onnx_adapter')."""
    return {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST
    }


def _remove_leftovers(out: Path) -> None:
    """Staging directories of earlier builds of `out` whose process is gone (killed, say by the OOM killer,
    before it could clean up): each can hold a whole model. A previous bundle moved aside is removed only
    once `out` holds its replacement (a build killed between the two renames leaves it the only copy)."""
    for kind in ("staging", "old") if is_bundle(out) else ("staging",):
        for path in out.parent.glob(f".{out.name}.edgec-{kind}-*"):
            pid = path.name.rpartition("-")[2]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class BundleWriter:
    """Stage a bundle next to `out`, then move it into place in one rename."""

    def __init__(self, out: Path, force: bool):
        self.out = Path(out)
        self.force = force
        check_output(self.out, force)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(self.out)
        self.staging = self.out.parent / f".{self.out.name}.edgec-staging-{os.getpid()}"
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()
        self.moved_aside: Path | None = None

    def copy_in(self, paths: list[Path]) -> None:
        for path in paths:
            shutil.copyfile(path, self.staging / path.name)

    def write_json(self, name: str, data: dict) -> Path:
        path = self.staging / name
        path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        return path

    def finish(self, manifest: dict) -> tuple[Path, dict]:
        manifest = {
            "format": BUNDLE_FORMAT,
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "edgec_version": __version__,
            **manifest,
            "files": file_entries(self.staging),
        }
        write_manifest(self.staging, manifest)
        check_output(self.out, self.force)  # the output may have changed during the build
        old = None
        if self.out.exists():
            if is_bundle(self.out) or not any(self.out.iterdir()):
                old = self.out.parent / f".{self.out.name}.edgec-old-{os.getpid()}"
                os.replace(self.out, old)
            else:
                self.moved_aside = self.out.with_name(f"{self.out.name}.backup-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(self.out, self.moved_aside)
        os.replace(self.staging, self.out)
        if old is not None:
            shutil.rmtree(old)
        return self.out, manifest

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
