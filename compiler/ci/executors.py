"""Where targets run: in this process, in local worker processes, or as Ray tasks. Each returns the
run_target results in the jobs' order."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from compiler.ci.run import run_target
from compiler.errors import UsageError

RAY_RETRIES = 2  # a worker killed mid-build (OOM killer, lost node) reruns the target on another


def run_in_process(jobs: list[dict], log) -> list[dict]:
    results = []
    for job in jobs:
        log(f"{job['model']}/{job['target']}: started")
        results.append(run_target(job))
        log(f"{job['model']}/{job['target']}: {results[-1]['status']}")
    return results


def available_memory_bytes() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def worker_count(jobs: list[dict], requested: int) -> int:
    """No more workers than the memory budget holds at the largest target's estimated peak."""
    available = available_memory_bytes()
    largest = max(job["estimate_bytes"] for job in jobs)
    by_memory = max(1, available // largest) if available else requested
    return max(1, min(requested, by_memory, len(jobs)))


def run_in_processes(jobs: list[dict], workers: int, log) -> list[dict]:
    workers = worker_count(jobs, workers)
    log(f"{len(jobs)} targets on {workers} worker processes")
    # spawn, not fork: a forked torch with its thread pools already started can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_target, job) for job in jobs]
        results = []
        for job, future in zip(jobs, futures):
            try:
                results.append(future.result())
            except Exception as e:  # the worker process died (killed, out of memory)
                results.append({"model": job["model"], "target": job["target"], "bundle": job["out"],
                                "status": "error", "error": f"worker process died: {type(e).__name__}: {e}"})
            log(f"{job['model']}/{job['target']}: {results[-1]['status']}")
    return results


def run_on_ray(jobs: list[dict], address: str | None, log) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray: Ray is not installed; pip install 'edgec[ci]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        # Workers import compiler/ from the same checkout as this driver.
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, "TOKENIZERS_PARALLELISM": "false"}}
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        else:
            # "local": a new instance here, never a cluster `ray start` left in /tmp/ray (possibly dead)
            ray.init(address="local", runtime_env=runtime_env, include_dashboard=False, log_to_driver=False)
    try:
        # A target estimated above every node's memory would wait forever as infeasible: it asks for the
        # largest node instead and runs there alone.
        largest_node = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        remote = ray.remote(max_retries=RAY_RETRIES, retry_exceptions=False)(run_target)
        refs = [remote.options(memory=min(job["estimate_bytes"], int(largest_node)) or None, num_cpus=1).remote(job) for job in jobs]
        log(f"{len(jobs)} targets submitted to Ray")
        results = []
        for job, ref in zip(jobs, refs):
            try:
                results.append(ray.get(ref))
            except Exception as e:  # retries spent: the target is reported, the others still are
                first = str(e).splitlines()[0] if str(e) else ""
                results.append({"model": job["model"], "target": job["target"], "bundle": job["out"],
                                "status": "error", "error": f"Ray task failed: {type(e).__name__}: {first}"})
            log(f"{job['model']}/{job['target']}: {results[-1]['status']}")
        return results
    finally:
        if started_here:
            ray.shutdown()
