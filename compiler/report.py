"""The build report: timed stages with progress lines and bars, adapters merged, export facts, validation
(JSON + Markdown)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tqdm import tqdm

from runtimes.agent import rss_mb
from runtimes.base import peak_rss_mb

# What a stage's loop reports to: progress(done, total), absolute counts, so that a loop whose total is
# known only as it goes (bytes of the shards read so far) reports as easily as one counting steps.
Progress = Callable[[int, int], None]


@dataclass
class BuildReport:
    quiet: bool = False
    stages: list[dict] = field(default_factory=list)
    adapters: list[dict] = field(default_factory=list)
    export: dict = field(default_factory=dict)
    export_pte: dict = field(default_factory=dict)
    passes: list[dict] = field(default_factory=list)
    validation: dict | None = None
    moved_aside: str | None = None
    quant_auto: dict = field(default_factory=dict)  # --quant auto: the plan's summary and the sensitivities
    smoothing: dict = field(default_factory=dict)  # channel smoothing: alpha, fold points considered and smoothed
    memory: dict = field(default_factory=dict)  # the peak RSS estimated at the start beside the measured one
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def stage(self, name: str, detail: str = ""):
        """Time a stage and print a progress line to stderr (stdout stays for results)."""
        if not self.quiet:
            print(f"  {name}{' ' + detail if detail else ''} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        # peak_rss_mb: the process's peak so far (the stage where it jumps is where memory peaks); rss_mb: what
        # is still held when the stage ends.
        self.stages.append({"stage": name, "seconds": round(seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
                            "rss_mb": round(rss_mb(os.getpid()) or 0.0, 1)})
        if not self.quiet:
            print(f"  {name} done in {seconds:.1f} s", file=sys.stderr, flush=True)

    @contextmanager
    def progress(self, name: str, unit: str = "it", unit_scale: bool = False) -> Iterator[Progress]:
        """A progress bar on stderr for a loop within a stage; yields the Progress the loop calls.

        Only on a terminal: a pipe or a CI log keeps the plain stage lines, without carriage-return
        redraws. The bar is cleared when it closes, so the stage's "done in" line follows the start line."""
        bar = tqdm(desc=f"    {name}", unit=unit, unit_scale=unit_scale, unit_divisor=1024 if unit == "B" else 1000,
                   file=sys.stderr, leave=False, dynamic_ncols=True,
                   disable=self.quiet or not sys.stderr.isatty())

        def advance(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
                bar.refresh()  # the percentage from the first step on, not after tqdm's next redraw
            bar.update(done - bar.n)

        try:
            yield advance
        finally:
            bar.close()

    def note(self, message: str) -> None:
        """A progress line within a stage (not with --quiet)."""
        if not self.quiet:
            print(f"    {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        """A warning the user sees even with --quiet, kept in the report."""
        self.warnings.append(message)
        print(f"edgec: warning: {message}", file=sys.stderr, flush=True)

    def to_dict(self) -> dict:
        return {
            "wall_s": round(time.perf_counter() - self.started, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "stages": self.stages,
            "adapters": self.adapters,
            "export": self.export,
            "export_pte": self.export_pte,
            "passes": self.passes,
            "validation": self.validation,
            "quant_auto": self.quant_auto,
            "smoothing": self.smoothing,
            "memory": self.memory,
            "warnings": self.warnings,
        }


def markdown(report: dict) -> str:
    lines = ["# edgec build report", "", f"Wall time {report['wall_s']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB.", ""]
    memory = report.get("memory")
    if memory:
        budget = f", budget {memory['budget_mb']:.0f} MB" if memory["budget_mb"] else ""
        lines[-1:-1] = [f"Peak RSS estimated at the start: {memory['estimate_mb']} MB ({memory['estimate_stage']}){budget}."]
    lines += ["## Stages", "", "| stage | seconds | peak RSS so far MB | RSS at its end MB |", "|---|---:|---:|---:|"]
    lines += [f"| {s['stage']} | {s['seconds']:.2f} | {s['peak_rss_mb']:.0f} | {s.get('rss_mb', 0):.0f} |"
              for s in report["stages"]]
    if report["adapters"]:
        lines += ["", "## Adapters", ""]
        for a in report["adapters"]:
            if "modules_merged" not in a:  # runtime LoRA: kept apart, in its own file
                lines += [f"### {a['name']}: {a['path']} (weight {a['weight']})", "",
                          f"Runtime LoRA: rank {'/'.join(map(str, a['ranks']))} on {', '.join(a['targets'])}, "
                          f"{a['modules']} modules, kept apart from the base.", ""]
                continue
            lines += [f"### {a['path']} (weight {a['weight']})", "", f"{a['modules_merged']} modules merged.", ""]
            lines += ["| module | rank | scale |", "|---|---:|---:|"]
            lines += [f"| {m['module']} | {m['rank']} | {m['scale']:.4g} |" for m in a["modules"]]
            if a["replaced"]:
                lines += ["", "Replaced outright: " + ", ".join(a["replaced"])]
            lines += [f"- {note}" for note in a["notes"]]
    if report["export"]:
        lines += ["", "## Export", ""]
        lines += [f"- {k}: {v}" for k, v in report["export"].items() if k != "op_counts"]
        ops = report["export"].get("op_counts", {})
        if ops:
            lines += ["- ops: " + ", ".join(f"{k} {v}" for k, v in ops.items())]
    if report.get("export_pte"):
        pte = report["export_pte"]
        lines += ["", "## ExecuTorch export", "", f"- torch.export {pte['export_s']:.1f} s, lowering {pte['lower_s']:.1f} s",
                  f"- {pte.get('layers', 'every layer lowered')}",
                  "- quantized: " + (", ".join(f"{k} {v}" for k, v in pte["quantized"].items()) or "nothing"),
                  f"- XNNPACK partitions: {pte['delegated'].get('xnnpack_partitions', 0)} "
                  f"({pte['delegated'].get('reused_partitions', 0)} reusing another's delegate passes)",
                  "- on portable kernels: " + (", ".join(f"{k} {v}" for k, v in pte["portable_ops"].items()) or "none")]
    if report.get("passes"):
        lines += ["", "## ONNX passes", "", "| pass | seconds | nodes before | nodes after | rewrites |", "|---|---:|---:|---:|---|"]
        for p in report["passes"]:
            rewrites = ", ".join(f"{k} {v}" for k, v in p["rewrites"].items()) or "-"
            lines.append(f"| {p['pass']} | {p['seconds']:.2f} | {p['nodes_before']} | {p['nodes_after']} | {rewrites} |")
    smoothing = report.get("smoothing")
    if smoothing:
        considered = smoothing.get("considered_by_input", {})  # older reports lack it
        kinds = ", ".join(f"{kind} {count}/{considered.get(kind, smoothing['fold_points'] // len(smoothing['by_input']))}"
                          for kind, count in smoothing["by_input"].items())
        lines += ["", "## Channel smoothing", "",
                  f"- alpha {smoothing['alpha']:g}: {smoothing['smoothed']} of {smoothing['fold_points']} fold points "
                  f"smoothed ({kinds}, by the Linear reading the input); the others' int4 rounding error was "
                  "lower without"]
    auto = report.get("quant_auto")
    if auto:
        lines += ["", "## Quantization plan (--quant auto)", "",
                  f"- KL to fp32 on calibration text, computed in PyTorch as the kernels round: "
                  f"{auto['kl_calibration']:.4g} (planned for {auto.get('planned_for', auto['max_kl']):.4g}, under "
                  f"the target {auto['max_kl']:g}: {'met' if auto['met'] else 'NOT met'}; each artifact's own is its "
                  f"kl_calibration gate); weights {auto['weight_mb']:.1f} MB "
                  f"(all int4 block 128: {auto['int4_block128_mb']:.1f} MB)",
                  "- modules: " + ", ".join(f"{k} {v}" for k, v in auto["modules"].items()),
                  "", "Most sensitive modules (KL to fp32 with the module alone quantized):", "",
                  "| module | int4 block 128 | int4 block 32 (est.) | chosen |", "|---|---:|---:|---|"]
        lines += [f"| {m['module']} | {m['kl_int4_block128']:.4g} | {m['kl_int4_block32']:.4g} | {m['chosen']} |"
                  for m in auto["most_sensitive"]]
    validation = report.get("validation")
    if validation:
        lines += ["", "## Validation", "", f"**{'PASSED' if validation['passed'] else 'FAILED'}**", ""]
        lines += [f"- {s}" for s in validation["summary"]]
    return "\n".join(lines) + "\n"
