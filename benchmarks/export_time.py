"""Export wall time and peak RSS: edgec's default int4 ONNX build from an empty trace cache (its one-layer graph
written by compiler/onnx/layer_graph.py where it covers the model) and the same build with that layer traced
(EDGEC_WRITE_LAYER=0), against the ONNX Runtime GenAI builder's default int4 CPU build. Alternating rounds
after one warm-up round, each export its own process, medians.

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


def edgec_build(model: Path, adapter: Path | None, out: Path, traces: Path,
                write_layer: bool = True) -> tuple[float, float]:
    settings = {"EDGEC_TRACE_CACHE": str(traces), "EDGEC_WRITE_LAYER": "1" if write_layer else "0"}
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)  # the child inherits them
    try:
        return timed([EDGEC, "build", "--model", model, *(["--adapter", adapter] if adapter else []), "--out", out,
                      "--quant", "int4", "--force", "--quiet", "--no-validate"])
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


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

    def edgec_cold(write_layer: bool):
        with tempfile.TemporaryDirectory(dir=work) as empty:
            return edgec_build(model, adapter, work / "edgec", Path(empty), write_layer)

    runs = {"edgec int4, first build": lambda: edgec_cold(True),
            "edgec int4, first build, layer traced": lambda: edgec_cold(False)}
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
          f"{os.cpu_count()} CPUs, medians of {args.rounds} alternating rounds after a warm-up round\n")
    print_table(["export", "wall (s)", "peak RSS (MB)", f"wall / {reference}"],
                [[name, f"{wall:.1f}", f"{rss:.0f}", f"{wall / medians[reference][0]:.2f}x"]
                 for name, (wall, rss) in medians.items()])


if __name__ == "__main__":
    main()
