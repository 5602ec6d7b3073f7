"""`edgec demo` end to end, offline, into a temporary cache directory."""

import json

from click.testing import CliRunner

from compiler.cli import main


def test_demo_builds_both_int4_artifacts_validates_benchmarks_and_summarises(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = result.stdout
    assert "edgec demo summary: validation PASSED" in summary
    header = next(line for line in summary.splitlines() if "ONNX int4" in line)
    assert ".pte int4 (ExecuTorch)" in header
    for row in ("KL to fp32 reference", "LoRA delta retained", "prefill", "decode", "peak RSS while running"):
        line = next(line for line in summary.splitlines() if line.lstrip().startswith(row))
        assert len([cell for cell in line.split("|")[1:] if cell.strip()]) == 2, line  # a value per artifact
    bundle = tmp_path / "demo-0.1.0" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [a["format"] for a in manifest["artifacts"]] == ["onnx", "pte"]
    assert all(a["validation"]["passed"] and a["precision"] == "int4" for a in manifest["artifacts"])
