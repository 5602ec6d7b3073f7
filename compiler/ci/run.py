"""One target of a recipe, built through `edgec build`'s own command or served from the cache.

run_target takes and returns plain dicts so the same function runs in-process, in a worker process and as a
Ray task.
"""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout
from pathlib import Path

import click

from compiler.bundle import is_bundle, read_manifest
from compiler.ci import cache
from compiler.ci.recipe import Recipe
from compiler.errors import CheckFailed, EdgecError


def jobs_for(recipe: Recipe, out: Path, cache_dir: Path | None) -> list[dict]:
    jobs = []
    for model in recipe.models:
        for target in recipe.targets:
            jobs.append({
                "model": model.name, "target": target.name,
                "model_dir": str(model.path), "adapters": list(model.adapters),
                "argv": list(target.argv), "options": dict(target.options),
                "calibration": str(target.calibration) if target.calibration else None,
                "out": str(out / model.name / target.name),
                "cache_dir": str(cache_dir) if cache_dir else None,
                "estimate_bytes": peak_estimate(model.path, target.options),
            })
    return jobs


def peak_estimate(model_dir: Path, options: dict) -> int:
    """A build's peak resident memory, roughly: the fp32 weights held by the reference, the merged copy,
    the exported graph and the runtime that validates it, plus the Python/torch baseline. Measured builds
    stay under this (report.json's peak_rss_mb); it only has to keep parallel builds from overcommitting."""
    weights = sum(p.stat().st_size for p in Path(model_dir).rglob("*.safetensors")) or \
        sum(p.stat().st_size for p in Path(model_dir).rglob("*.bin"))
    factor = 5 if "pte" in str(options.get("format", "onnx")) else 4
    return int(factor * weights + 1.5e9)


def run_target(job: dict) -> dict:
    started = time.monotonic()
    out = Path(job["out"])
    result = {"model": job["model"], "target": job["target"], "bundle": str(out), "error": None}
    try:
        key = cache.target_key(Path(job["model_dir"]), job["adapters"], job["options"],
                               Path(job["calibration"]) if job["calibration"] else None)
        result["cache_key"] = key
        entry = cache.lookup(Path(job["cache_dir"]), key) if job["cache_dir"] else None
        if out.exists() and any(out.iterdir()) and not is_bundle(out):
            raise EdgecError(f"{out}: exists and is not an edgec bundle; remove it or choose another --out")
        if entry is not None:
            cache.restore(entry, out)
            result["status"] = "cached"
        else:
            result["status"] = _build(job, out)
            # A gate failure is as much a function of the inputs as a pass: cached too, so reruns report it fast.
            if result["status"] in ("built", "failed") and job["cache_dir"]:
                cache.store(Path(job["cache_dir"]), key, out)
    except EdgecError as e:
        result.update(status="error", error=str(e))
    except click.ClickException as e:  # the build command's own checks on its arguments
        result.update(status="error", error=e.format_message())
    except Exception as e:  # a bug in one target must not take the others' report with it
        first = str(e).splitlines()[0] if str(e) else ""
        result.update(status="error", error=f"internal error: {type(e).__name__}: {first}")
    result["wall_s"] = round(time.monotonic() - started, 3)
    if result["status"] in ("built", "cached", "failed") and is_bundle(out):
        result.update(_bundle_facts(out))
    return result


def _build(job: dict, out: Path) -> str:
    """`edgec build` with the target's arguments: 'built', or 'failed' when a gate failed (bundle written)."""
    from compiler.cli import build

    argv = ["--model", job["model_dir"], "--out", str(out), "--quiet"]
    for adapter in job["adapters"]:
        argv += ["--adapter", adapter]
    argv += job["argv"]
    try:
        with redirect_stdout(io.StringIO()):  # the one-bundle summary; the CI report replaces it
            build.main(args=argv, prog_name="edgec build", standalone_mode=False)
    except CheckFailed:
        return "failed"
    return "built"


def _bundle_facts(out: Path) -> dict:
    manifest = read_manifest(out)
    gates = []
    for artifact in manifest["artifacts"]:
        validation = artifact.get("validation") or {}
        for gate, explanation in zip(validation.get("gates", []), validation.get("summary", [])):
            gates.append({"format": artifact["format"], **gate, "explain": explanation})
    validation = manifest.get("validation")
    return {
        "size_bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "formats": [a["format"] for a in manifest["artifacts"]],
        "validation": None if validation is None else ("passed" if validation["passed"] else "failed"),
        "gates": gates,
    }
