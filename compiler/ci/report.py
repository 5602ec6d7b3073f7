"""The CI run's reports: summary.md (people), junit.xml (CI systems' test views), results.json (scripts)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from compiler import __version__


def failures(results: list[dict]) -> list[str]:
    """One phrase per failed target, gate or regression, for the exit line."""
    out = []
    for r in results:
        name = f"{r['model']}/{r['target']}"
        if r["status"] == "error":
            out.append(f"{name} did not build ({r['error']})")
        for gate in r.get("gates", []):
            if not gate["passed"]:
                out.append(f"{name} {gate['format']} gate {gate['metric']}")
        for bench in r.get("bench", []):
            if bench.get("regression"):
                out.append(f"{name} slower on {bench['device']} ({bench['regression']})")
            if bench.get("error"):
                out.append(f"{name} bench on {bench['device']} failed")
    return out


def write_all(out: Path, recipe_path: Path, results: list[dict], wall_s: float) -> None:
    document = {"format": "edgec-ci/1", "edgec_version": __version__, "recipe": str(recipe_path),
                "wall_s": round(wall_s, 3), "passed": not failures(results), "failures": failures(results),
                "targets": results}
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / "summary.md").write_text(summary_md(results, wall_s))
    junit(results).write(out / "junit.xml", encoding="utf-8", xml_declaration=True)


def _size(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.1f} MB"


def _speed(r: dict) -> str:
    parts = []
    for b in r.get("bench", []):
        if b.get("error"):
            parts.append(f"{b['device']}: error")
            continue
        text = f"{b['device']}: {b['decode_tok_s']:.1f} tok/s"
        if b.get("change") is not None:
            text += f" ({b['change']:+.1%} vs baseline)"
        parts.append(text)
    return "; ".join(parts)


def summary_md(results: list[dict], wall_s: float) -> str:
    lines = ["# edgec ci", ""]
    bad = failures(results)
    lines.append(f"**{'FAILED' if bad else 'PASSED'}**: {len(results)} targets in {wall_s:.1f} s"
                 + (f"; failed: {', '.join(bad)}" if bad else ""))
    benched = any(r.get("bench") for r in results)
    for model in dict.fromkeys(r["model"] for r in results):
        lines += ["", f"## {model}", ""]
        header = ["target", "size", "gates", "validation"] + (["speed"] if benched else []) + ["source"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in (r for r in results if r["model"] == model):
            gates = r.get("gates", [])
            gate_text = f"{sum(g['passed'] for g in gates)}/{len(gates)} passed"
            failed = [f"{g['metric']}" for g in gates if not g["passed"]]
            if failed:
                gate_text += " (failed: " + ", ".join(failed) + ")"
            validation = r.get("validation") or ("error: " + r["error"] if r["status"] == "error" else "not run")
            source = {"cached": "cached", "built": f"built in {r['wall_s']:.1f} s",
                      "failed": f"built in {r['wall_s']:.1f} s"}.get(r["status"], "error")
            row = [r["target"], _size(r.get("size_bytes")), gate_text if gates else "", validation.replace("|", "\\|")]
            lines.append("| " + " | ".join(row + ([_speed(r)] if benched else []) + [source]) + " |")
    return "\n".join(lines) + "\n"


def junit(results: list[dict]) -> ET.ElementTree:
    """A testsuite per model; a case per target's build and one per gate (and per bench device)."""
    root = ET.Element("testsuites", name="edgec ci")
    for model in dict.fromkeys(r["model"] for r in results):
        suite = ET.SubElement(root, "testsuite", name=model)
        cases = 0
        failed = errors = 0
        for r in (r for r in results if r["model"] == model):
            classname = f"{model}.{r['target']}"
            case = ET.SubElement(suite, "testcase", classname=classname, name="build", time=f"{r['wall_s']:.3f}")
            cases += 1
            if r["status"] == "error":
                ET.SubElement(case, "error", message=r["error"])
                errors += 1
            else:
                ET.SubElement(case, "system-out").text = f"{r['status']}: {r['bundle']}"
            for gate in r.get("gates", []):
                case = ET.SubElement(suite, "testcase", classname=classname, name=f"{gate['format']}:{gate['metric']}")
                cases += 1
                if not gate["passed"]:
                    ET.SubElement(case, "failure", message=gate["explain"])
                    failed += 1
            for bench in r.get("bench", []):
                case = ET.SubElement(suite, "testcase", classname=classname, name=f"bench:{bench['device']}")
                cases += 1
                if bench.get("error") or bench.get("regression"):
                    ET.SubElement(case, "failure", message=bench.get("error") or bench["regression"])
                    failed += 1
        suite.set("tests", str(cases))
        suite.set("failures", str(failed))
        suite.set("errors", str(errors))
    ET.indent(root)
    return ET.ElementTree(root)
