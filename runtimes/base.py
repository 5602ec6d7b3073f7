"""What every runtime and device shares: the benchmark spec and the result schema.

Standard library only: this file travels with the on-device bench agent.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
from dataclasses import asdict, dataclass, field

BENCH_SCHEMA = "edgec.bench/1"


@dataclass(frozen=True)
class BenchSpec:
    prompt_tokens: int = 128
    new_tokens: int = 128
    warmup: int = 1
    repeats: int = 3
    threads: int = 0  # 0: the runtime's default
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchResult:
    """One benchmark run of one artifact on one device; medians over `spec.repeats`."""

    runtime: dict
    device: dict
    bundle: dict
    spec: dict
    load_s: float
    ttft_s: float
    prefill_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_mb: float
    artifact_bytes: int
    samples: dict = field(default_factory=dict)
    schema: str = BENCH_SCHEMA

    def to_dict(self) -> dict:
        return asdict(self)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process.

    Linux: VmHWM, because ru_maxrss survives exec and would report the parent's peak in a child
    started by a large process. Elsewhere ru_maxrss (macOS reports bytes, others KiB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def local_device_facts() -> dict:
    return {
        "name": "local",
        "hostname": platform.node(),
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def bench_agent_main(description: str, run, argv: list[str] | None = None) -> int:
    """The command line of a bench agent: `python -m runtimes.X BUNDLE [options]` -> result JSON on stdout.
    `run(bundle, spec)` returns a BenchResult."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("bundle")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    spec = BenchSpec(args.prompt_tokens, args.new_tokens, args.warmup, args.repeats, args.threads)
    json.dump(run(args.bundle, spec).to_dict(), sys.stdout)
    return 0
