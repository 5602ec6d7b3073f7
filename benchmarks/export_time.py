"""Export wall time and peak RSS: edgec's default int4 ONNX build, with and without the one-layer trace cached
by an earlier build, against the ONNX Runtime GenAI builder's default int4 CPU build. Alternating rounds, each
export its own process, medians.

    python -m benchmarks.export_time [--rounds N] [--model DIR]   # default: SmolLM2-135M shape + rank-16 LoRA

With --model (no adapter) the builder converts the model as it is; without it, the builder runs on the model
merged with PEFT first (the merge is timed with it) and with its adapter_path option.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import (BIN, EDGEC, SMOLLM2_WORK, argument_parser, print_table, rotations,
                               smollm2_with_adapter, timed, timed_peft_merge)


def edgec_build(model: Path, adapter: Path | None, out: Path, traces: Path) -> tuple[float, float]:
    before = os.environ.get("EDGEC_TRACE_CACHE")
    os.environ["EDGEC_TRACE_CACHE"] = str(traces)  # the child inherits it
    try:
        return timed([EDGEC, "build", "--model", model, *(["--adapter", adapter] if adapter else []), "--out", out,
                      "--quant", "int4", "--force", "--quiet", "--no-validate"])
    finally:
        if before is None:
            del os.environ["EDGEC_TRACE_CACHE"]
        else:
            os.environ["EDGEC_TRACE_CACHE"] = before


def builder(model: Path, out: Path, work: Path, *extra: str) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    return timed([BIN / "python", "-m", "onnxruntime_genai.models.builder", "-i", model, "-o", out, "-p", "int4",
                  "-e", "cpu", "-c", work / "hf-cache", *extra])


def main() -> None:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--work", type=Path, default=SMOLLM2_WORK)
    parser.add_argument("--model", type=Path, help="A model directory to export as it is (no adapter).")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = args.work / "export-time"
    work.mkdir(parents=True, exist_ok=True)
    model, adapter = (args.model, None) if args.model else smollm2_with_adapter(args.work)
    warm = work / "traces-warm"
    shutil.rmtree(warm, ignore_errors=True)
    edgec_build(model, adapter, work / "edgec", warm)  # stores the trace that the "cached" rows load

    def edgec_cold():
        with tempfile.TemporaryDirectory(dir=work) as empty:
            return edgec_build(model, adapter, work / "edgec", Path(empty))

    runs = {"edgec int4, first build (traces)": edgec_cold,
            "edgec int4, trace cached": lambda: edgec_build(model, adapter, work / "edgec", warm)}
    if adapter is None:
        runs["builder int4"] = lambda: builder(model, work / "builder", work)
    else:
        def merged_then_builder():
            merge_wall, merge_rss = timed_peft_merge(model, adapter, work / "peft-merged")
            wall, rss = builder(work / "peft-merged", work / "builder", work)
            return wall + merge_wall, max(rss, merge_rss)

        runs["builder int4 (PEFT-merged)"] = merged_then_builder
        runs["builder int4 (adapter_path)"] = lambda: builder(model, work / "builder", work,
                                                              "--extra_options", f"adapter_path={adapter}")
    samples = {name: [] for name in runs}
    for round_index, order in enumerate(rotations(list(runs), args.rounds)):
        for name in order:
            wall, rss = runs[name]()
            print(f"round {round_index} {name}: {wall:.1f} s, {rss:.0f} MB", flush=True)
            if round_index:  # round 0 warms the page cache
                samples[name].append((wall, rss))
    medians = {name: (statistics.median(w for w, _ in s), statistics.median(r for _, r in s))
               for name, s in samples.items()}
    reference = next(name for name in runs if name.startswith("builder"))
    print(f"\n{'model ' + str(model) if adapter is None else 'SmolLM2-135M shape + rank-16 LoRA'}, "
          f"{os.cpu_count()} CPUs, medians of {args.rounds} alternating rounds\n")
    print_table(["export", "wall (s)", "peak RSS (MB)", f"wall / {reference}"],
                [[name, f"{wall:.1f}", f"{rss:.0f}", f"{wall / medians[reference][0]:.2f}x"]
                 for name, (wall, rss) in medians.items()])


if __name__ == "__main__":
    main()
