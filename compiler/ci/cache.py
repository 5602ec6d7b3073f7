"""Content-addressed bundle cache: a target's key is the sha256 of everything its bundle depends on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from compiler import __version__
from compiler.bundle import is_bundle, library_versions
from runtimes.base import sha256_file


def default_dir() -> Path:
    from compiler.config import default_cache_dir

    return default_cache_dir() / "ci-cache"


def tree_hashes(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `directory`, like a manifest's file entries: the key
    follows the content, not the folder's location, so two CI checkouts share entries."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def target_key(model_dir: Path, adapters: list[str], options: dict, calibration: Path | None) -> str:
    from compiler.frontend.lora import AdapterSpec

    specs = [AdapterSpec.parse(a) for a in adapters]
    inputs = {
        "edgec": __version__,
        # the exporters' and quantizers' versions decide the bundle's bytes as much as edgec's own
        "libraries": library_versions(),
        "model": tree_hashes(model_dir),
        "adapters": [{"name": s.name, "weight": s.weight, "files": tree_hashes(s.path)} for s in specs],
        "calibration": sha256_file(calibration) if calibration else None,
        # the calibration path itself is not an input, its content is (above)
        "options": {k: v for k, v in options.items() if k != "calibration"},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def lookup(cache_dir: Path, key: str) -> Path | None:
    entry = Path(cache_dir) / key
    return entry if is_bundle(entry) else None


def store(cache_dir: Path, key: str, bundle: Path) -> None:
    """Copy into a temporary name and rename, so a concurrent run or a killed one never leaves half an entry."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache_dir / key
    if is_bundle(entry):
        return
    staging = cache_dir / f".{key}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(bundle, staging)
    try:
        staging.rename(entry)
    except OSError:  # another job stored the same key first
        shutil.rmtree(staging, ignore_errors=True)


def restore(entry: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(entry, out)
