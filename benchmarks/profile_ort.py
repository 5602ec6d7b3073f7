"""Where an ONNX bundle spends its time in onnxruntime: kernel time per operator, prefill and decode apart.

    python -m benchmarks.profile_ort BUNDLE [--prompt-tokens 128] [--new-tokens 64]
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import argument_parser, print_table, rerun_on_huge_pages
from runtimes.ort import OrtRuntime


def profile(bundle: Path, prompt_tokens: int, new_tokens: int) -> list[dict]:
    """onnxruntime's profiler events over edgec's own loop (shared KV buffer)."""
    import onnxruntime as ort

    runner = OrtRuntime(bundle)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "edgec")
    runner.session = ort.InferenceSession(str(runner.model_path), options, providers=["CPUExecutionProvider"])
    prompt = np.random.default_rng(0).integers(3, 1000, prompt_tokens).tolist()
    runner.generate(prompt, new_tokens, shared_buffer=True)
    return json.loads(Path(runner.session.end_profiling()).read_text())


def summarise(events: list[dict]) -> None:
    """Sums the `*_kernel_time` events by operator for the first run (the prefill) and for the decode runs, and
    compares the kernels' sum with the whole runs (the rest is per-op dispatch and framework overhead)."""
    runs = [e for e in events if e.get("name") == "model_run"]
    kernels = [e for e in events if e.get("name", "").endswith("_kernel_time")]
    first_end = runs[0]["ts"] + runs[0]["dur"]
    for label, selected, run_events in (
        ("prefill", [k for k in kernels if k["ts"] <= first_end], runs[:1]),
        ("decode", [k for k in kernels if k["ts"] > first_end], runs[1:]),
    ):
        per_op: dict[str, float] = defaultdict(float)
        for k in selected:
            per_op[k["args"]["op_name"]] += k["dur"]
        total_kernels = sum(per_op.values())
        total_runs = sum(r["dur"] for r in run_events)
        print(f"\n{label}: {len(run_events)} runs, {total_runs / 1000 / max(len(run_events), 1):.2f} ms per run, "
              f"kernels {100 * total_kernels / total_runs:.0f}% of it")
        print_table(["op", "% of kernel time", "ms per run"],
                    [[op, f"{100 * dur / total_kernels:.1f}", f"{dur / 1000 / max(len(run_events), 1):.3f}"]
                     for op, dur in sorted(per_op.items(), key=lambda kv: -kv[1])])


def main() -> None:
    rerun_on_huge_pages()
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    summarise(profile(args.bundle, args.prompt_tokens, args.new_tokens))


if __name__ == "__main__":
    main()
