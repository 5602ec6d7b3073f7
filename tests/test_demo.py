"""`edgec demo` end to end, offline, into a temporary cache directory."""

from click.testing import CliRunner

from compiler.cli import main


def test_demo_builds_validates_benchmarks_and_prints_a_summary(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = result.stdout
    assert "edgec demo summary" in summary
    assert any(line.startswith("validation") and line.rstrip().endswith("PASSED") for line in summary.splitlines())
    for row in ("logits max-abs error", "greedy tokens identical", "prefill", "decode", "peak RSS while running"):
        assert row in summary
    bundle = tmp_path / "demo-0.1.0" / "bundle"
    assert (bundle / "manifest.json").exists() and (bundle / "model.onnx").exists()
    # A second run reuses the cached model and replaces its own bundle.
    again = CliRunner().invoke(main, ["demo", "--cache-dir", str(tmp_path)])
    assert again.exit_code == 0, again.output
