"""`edgec report`: bench results (edgec.bench/1 JSON, any runtime, any device) -> a Markdown table, a PNG
chart of decode speed against context depth, and a regression gate against a baseline result."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from compiler.errors import UsageError

CHART_SOFTWARE = "edgec report"  # written into the PNG, so a rerun may replace its own chart and nothing else


def load_result(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror}); pass files written by `edgec bench --json`") from None
    except ValueError:
        raise UsageError(f"{path}: not JSON; pass files written by `edgec bench --json`") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("edgec.bench/"):
        raise UsageError(f"{path}: not an edgec bench result (no edgec.bench schema); write one with `edgec bench --json`")
    return data


def labels(paths: list[Path]) -> list[str]:
    """File stems, or parent/stem where stems repeat."""
    stems = [Path(p).stem for p in paths]
    return [f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


def depth_entries(result: dict) -> list[dict]:
    """Per context depth: medians and the samples (results without depths have one entry, depth 0)."""
    if result.get("by_depth"):
        return result["by_depth"]
    keys = ("ttft_s", "prefill_s", "prefill_tokens_per_s", "decode_tokens_per_s", "samples")
    return [{"depth": 0, **{k: result[k] for k in keys}}]


def rates(entry: dict, spec: dict, metric: str) -> list[float]:
    """The per-run tokens/s behind a median: prefill (prompt tokens / s) or decode (new tokens - 1 / s)."""
    if metric == "prefill":
        return [spec["prompt_tokens"] / s for s in entry["samples"].get("prefill_s", []) if s > 0]
    return [max(spec["new_tokens"] - 1, 1) / s for s in entry["samples"].get("decode_s", []) if s > 0]


def merge_runs(results: list[dict]) -> dict:
    """Several runs of one bundle on one device and spec (say, rounds alternated with other devices on a
    shared machine) as one result: samples pooled per depth, medians recomputed, the peak RSS the largest."""
    from runtimes.base import median

    settings = {r["device"].get("huge_pages") for r in results}
    if len(settings) > 1:
        raise UsageError("these runs differ in --huge-pages/--no-huge-pages; merge runs of one setting only")
    merged = copy.deepcopy(results[0])
    entries = [depth_entries(r) for r in results]
    spec = merged["spec"]
    pooled = []
    for per_run in zip(*entries):
        samples = {k: [v for e in per_run for v in e["samples"][k]] for k in ("prefill_s", "ttft_s", "decode_s")}
        pooled.append({"depth": per_run[0]["depth"], "ttft_s": median(samples["ttft_s"]),
                       "prefill_s": median(samples["prefill_s"]),
                       "prefill_tokens_per_s": spec["prompt_tokens"] / median(samples["prefill_s"]),
                       "decode_tokens_per_s": max(spec["new_tokens"] - 1, 1) / median(samples["decode_s"]),
                       "samples": samples})
    merged["by_depth"] = pooled
    merged.update({k: pooled[0][k] for k in ("ttft_s", "prefill_s", "prefill_tokens_per_s", "decode_tokens_per_s",
                                             "samples")})
    merged["load_s"] = median([r["load_s"] for r in results])
    merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    merged["huge_pages_mb"] = max(r.get("huge_pages_mb", 0.0) for r in results)
    spec["repeats"] = sum(r["spec"]["repeats"] for r in results)
    merged["rounds"] = len(results)
    return merged


def _spread(values: list[float], digits: int) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}" if values else "-"


def _device(result: dict) -> str:
    """Name, arch, CPU count and the kernel-relevant CPU features (which int4 path onnxruntime takes)."""
    device = result["device"]
    features = device.get("cpu_features")  # results written before features were recorded have none
    cpu = device.get("emulated_cpu") or device.get("cpu_model")
    return (f"{device['name']} ({device.get('arch', '?')}{', ' + cpu if cpu else ''}, {device.get('cpu_count', '?')} CPUs"
            f"{'; ' + ' '.join(features) if features else ''})")


def markdown(results: list[dict], names: list[str]) -> str:
    lines = ["| run | device | runtime | bundle | size (MB) | load (ms) | TTFT (ms) | prefill (tok/s) "
             "| decode (tok/s) [min-max] | peak RSS (MB) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in zip(names, results):
        first = depth_entries(r)[0]
        runtime = r["runtime"]
        decode = rates(first, r["spec"], "decode")
        lines.append(
            f"| {name} | {_device(r)} | {runtime['name']} {runtime['version']}, {runtime['threads']} threads "
            f"| {str(r['bundle'].get('manifest_sha256') or '?')[:12]} | {r['artifact_bytes'] / 1e6:.1f} "
            f"| {r['load_s'] * 1000:.0f} | {first['ttft_s'] * 1000:.1f} | {first['prefill_tokens_per_s']:.0f} "
            f"| {first['decode_tokens_per_s']:.1f} [{_spread(decode, 1)}] | {r['peak_rss_mb']:.0f} |")
    lines += ["", "| run | context depth | TTFT (ms) | prefill (tok/s) [min-max] | decode (tok/s) [min-max] |",
              "|---|---:|---:|---:|---:|"]
    for name, r in zip(names, results):
        for entry in depth_entries(r):
            lines.append(f"| {name} | {entry['depth']} | {entry['ttft_s'] * 1000:.1f} "
                         f"| {entry['prefill_tokens_per_s']:.0f} [{_spread(rates(entry, r['spec'], 'prefill'), 0)}] "
                         f"| {entry['decode_tokens_per_s']:.1f} [{_spread(rates(entry, r['spec'], 'decode'), 1)}] |")
    specs: dict = {}
    for n, r in zip(names, results):
        specs.setdefault(f"prompt {r['spec']['prompt_tokens']} tokens, {r['spec']['new_tokens']} new tokens", []).append(n)
    which = "; ".join(specs) if len(specs) == 1 else "; ".join(f"{', '.join(n)}: {s}" for s, n in specs.items())
    lines.append(f"\n{which}; medians of each run's repeats, [min-max] over them; TTFT, prefill and decode at "
                 "the first depth in the first table.")
    profiles = [f"{n}: {r['device']['profile']['note']}" for n, r in zip(names, results) if r["device"].get("profile")]
    lines += [f"profile {p}" for p in profiles]
    return "\n".join(lines)


def check_chart_path(path: Path) -> None:
    """Refuse to replace a file that is not a chart edgec report wrote."""
    if path.is_dir():
        raise UsageError(f"--chart {path}: is a directory; give a .png file name")
    if path.exists():
        head = path.read_bytes()[:4096]
        if not (head.startswith(b"\x89PNG") and CHART_SOFTWARE.encode() in head):
            raise UsageError(f"--chart {path}: exists and was not written by edgec report; choose another --chart")
    if not path.parent.is_dir():
        raise UsageError(f"--chart {path}: directory {path.parent} does not exist")


def write_chart(results: list[dict], names: list[str], path: Path) -> None:
    """Decode tokens/s against context depth, one line per run (min-max band where there are repeats)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: CI machines and ssh sessions
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name, r in zip(names, results):
        entries = depth_entries(r)
        depths = [e["depth"] for e in entries]
        line, = ax.plot(depths, [e["decode_tokens_per_s"] for e in entries], marker="o",
                        label=f"{name}: {r['device']['name']}, {r['runtime']['name']}")
        spreads = [rates(e, r["spec"], "decode") for e in entries]
        if all(spreads) and len(depths) > 1:
            ax.fill_between(depths, [min(s) for s in spreads], [max(s) for s in spreads], color=line.get_color(),
                            alpha=0.15, linewidth=0)
    ax.set_xlabel("context depth (tokens in the KV cache)")
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_title("edgec bench: decode speed against context depth")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": CHART_SOFTWARE})
    plt.close(fig)


def parse_margin(text: str) -> float:
    """'5%' or '5' -> 0.05."""
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        value = -1
    if not 0 <= value < 100:
        raise UsageError(f"--fail-if-slower {text}: expected a percentage in [0, 100), e.g. 5%")
    return value / 100


def compare(baseline: dict, result: dict, name: str, margin: float) -> tuple[list[str], list[str]]:
    """Markdown rows comparing medians at each depth both have, and the regressions past the margin."""
    rows, failures = [], []
    base_by_depth = {e["depth"]: e for e in depth_entries(baseline)}
    for entry in depth_entries(result):
        base = base_by_depth.get(entry["depth"])
        if base is None:
            continue
        for metric in ("prefill", "decode"):
            old, new = base[f"{metric}_tokens_per_s"], entry[f"{metric}_tokens_per_s"]
            change = new / old - 1
            slower = change < -margin
            verdict = f"SLOWER by more than {margin:.0%}" if slower else "ok"
            rows.append(f"| {name} | {metric} | {entry['depth']} | {old:.1f} "
                        f"[{_spread(rates(base, baseline['spec'], metric), 1)}] | {new:.1f} "
                        f"[{_spread(rates(entry, result['spec'], metric), 1)}] | {change:+.1%} | {verdict} |")
            if slower:
                failures.append(f"{name} {metric} at depth {entry['depth']}: {new:.1f} tok/s vs baseline "
                                f"{old:.1f} ({change:+.1%}, margin {margin:.0%})")
    if not rows:
        raise UsageError(f"{name}: no context depth in common with the baseline; bench both with the same --depths")
    return rows, failures


def gate_table(baseline: dict, results: list[dict], names: list[str], margin: float) -> tuple[str, list[str]]:
    lines = ["| run | metric | depth | baseline tok/s [min-max] | new tok/s [min-max] | change | verdict |",
             "|---|---|---:|---:|---:|---:|---|"]
    failures = []
    notes = []
    for name, r in zip(names, results):
        rows, failed = compare(baseline, r, name, margin)
        lines += rows
        failures += failed
        if r["device"].get("name") != baseline["device"].get("name") or r["spec"] != baseline["spec"]:
            notes.append(f"note: {name} ran on another device or with another spec than the baseline")
    return "\n".join(lines + notes), failures
