"""`edgec ci RECIPE --out DIR`: every model x target built (or taken from the cache), benched where the
recipe asks, reported; CheckFailed names what failed once the reports are written."""

from __future__ import annotations

import json
import time
from pathlib import Path

from compiler.ci import report
from compiler.ci.recipe import Bench, load
from compiler.ci.run import jobs_for
from compiler.errors import CheckFailed, UsageError


def run_ci(recipe_path: Path, out: Path, jobs: int = 1, cache_dir: Path | None = None, executor: str = "local",
           ray_address: str | None = None, log=print) -> dict:
    started = time.monotonic()
    recipe = load(recipe_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = jobs_for(recipe, out.resolve(), Path(cache_dir).resolve() if cache_dir else None)
    if executor == "ray":
        from compiler.ci.executors import run_on_ray

        results = run_on_ray(work, ray_address, log)
    elif jobs > 1:
        from compiler.ci.executors import run_in_processes

        results = run_in_processes(work, jobs, log)
    else:
        from compiler.ci.executors import run_in_process

        results = run_in_process(work, log)
    if recipe.bench:
        # Benches run one at a time on this machine after the builds: parallel builds would skew the timings.
        baseline = _baseline(recipe.bench)
        for r in results:
            if r["status"] in ("built", "cached"):
                r["bench"] = [_bench_one(r, device, recipe.bench, baseline, log) for device in recipe.bench.devices]
    wall_s = time.monotonic() - started
    report.write_all(out, recipe.path, results, wall_s)
    failed = report.failures(results)
    if failed:
        raise CheckFailed(f"ci: {len(failed)} failed: {'; '.join(failed)} (see {out / 'summary.md'})")
    return {"results": results, "wall_s": wall_s}


def _baseline(bench: Bench) -> dict:
    """(model, target, device) -> decode tok/s from an earlier run's results.json."""
    if bench.baseline is None:
        return {}
    path = bench.baseline / "results.json" if bench.baseline.is_dir() else bench.baseline
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read the bench baseline (an earlier `edgec ci` results.json): {e}") from None
    return {(r["model"], r["target"], b["device"]): b["decode_tok_s"]
            for r in document.get("targets", []) for b in r.get("bench", []) if b.get("decode_tok_s")}


def _bench_one(result: dict, device_name: str, bench: Bench, baseline: dict, log) -> dict:
    from devices.bench import make_device, run_bench
    from devices.report import depth_entries
    from runtimes.base import BenchSpec
    from compiler.errors import EdgecError

    entry = {"device": device_name}
    profile = device_name.partition(":")[2] if device_name.startswith("profile:") else None
    log(f"{result['model']}/{result['target']}: bench on {device_name}")
    try:
        spec = BenchSpec(prompt_tokens=bench.prompt_tokens, new_tokens=bench.new_tokens, repeats=bench.repeats)
        measured = run_bench(Path(result["bundle"]), spec, make_device("local", profile))
    except EdgecError as e:
        entry["error"] = str(e)
        return entry
    entry["decode_tok_s"] = depth_entries(measured)[0]["decode_tokens_per_s"]
    before = baseline.get((result["model"], result["target"], device_name))
    if before:
        entry["change"] = entry["decode_tok_s"] / before - 1
        if entry["change"] < -bench.fail_if_slower:
            entry["regression"] = (f"decode {entry['decode_tok_s']:.1f} tok/s vs baseline {before:.1f} "
                                   f"({entry['change']:+.1%}, limit -{bench.fail_if_slower:.0%})")
    return entry
