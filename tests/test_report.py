"""edgec report: real bench results in, a Markdown table, a PNG chart and a regression gate out."""

import copy
import json

import pytest
from click.testing import CliRunner

from compiler.cli import main

BENCH = ["--prompt-tokens", "8", "--new-tokens", "8", "--repeats", "3", "--warmup", "0", "--depths", "0,32",
         "--json", "--quiet"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def results(tiny_bundle, tmp_path_factory):
    """Two real runs on one bundle: this machine, and the rpi5 profile."""
    directory = tmp_path_factory.mktemp("results")
    paths = []
    for name, extra in (("desktop", []), ("rpi5", ["--profile", "rpi5"])):
        result = run("bench", tiny_bundle, *BENCH, *extra)
        assert result.exit_code == 0, result.output
        paths.append(directory / f"{name}.json")
        paths[-1].write_text(result.stdout)
    return paths


def slowed(path, factor, out):
    """The same result with every decode sample `factor` times longer (and the medians to match)."""
    data = json.loads(path.read_text())
    for entry in [data, *data["by_depth"]]:
        entry["samples"]["decode_s"] = [s * factor for s in entry["samples"]["decode_s"]]
        entry["decode_tokens_per_s"] /= factor
    out.write_text(json.dumps(data))
    return out


def test_table_and_chart(results, tmp_path):
    chart = tmp_path / "chart.png"
    result = run("report", *results, "--chart", chart)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| run | device | runtime | bundle |")
    desktop = next(line for line in lines if line.startswith("| desktop | local ("))
    assert "onnxruntime 1.32.0" in desktop
    features = json.loads(results[0].read_text())["device"]["cpu_features"]
    assert features and " ".join(features) in desktop  # which kernels the device's CPU can take
    sha = json.loads(results[0].read_text())["bundle"]["manifest_sha256"]
    assert sha[:12] in desktop
    assert any(line.startswith("| rpi5 | local (profile rpi5)") and "4 threads" in line for line in lines)
    assert sum(line.startswith("| desktop | 32 |") for line in lines) == 1  # one row per depth
    assert "emulated on this machine" in result.stdout
    import matplotlib.image

    image = matplotlib.image.imread(chart)
    assert image.shape[0] > 200 and image.shape[1] > 300
    again = run("report", *results, "--chart", chart)  # its own chart may be replaced
    assert again.exit_code == 0, again.output


def test_chart_never_replaces_a_users_file(results, tmp_path):
    precious = tmp_path / "notes.png"
    precious.write_text("mine")
    result = run("report", *results, "--chart", precious)
    assert result.exit_code == 2 and "not written by edgec report" in result.stderr
    assert precious.read_text() == "mine"


def test_gate_passes_within_the_margin_and_fails_past_it(results, tmp_path):
    baseline = results[0]
    same = run("report", "--baseline", baseline, "--fail-if-slower", "5%", baseline, "--no-chart")
    assert same.exit_code == 0, same.output
    assert "| desktop | decode | 32 |" in same.stdout and "+0.0%" in same.stdout

    slower = slowed(baseline, 1.25, tmp_path / "new.json")  # decode 20% slower
    failed = run("report", "--baseline", baseline, "--fail-if-slower", "5%", slower, "--no-chart")
    assert failed.exit_code == 1
    assert "SLOWER by more than 5%" in failed.stdout and "-20.0%" in failed.stdout
    error = failed.stderr.strip().splitlines()
    assert len(error) == 1 and "new decode at depth 0" in error[0] and "new decode at depth 32" in error[0]
    assert "prefill" not in error[0]
    tolerant = run("report", "--baseline", baseline, "--fail-if-slower", "25", slower, "--no-chart")
    assert tolerant.exit_code == 0, tolerant.output


@pytest.mark.parametrize("args, fragment", [
    (["--fail-if-slower", "5%"], "needs --baseline"),
    (["--baseline", "{r}", "--fail-if-slower", "fast"], "--fail-if-slower fast"),
    (["{tmp}/missing.json"], "missing.json"),
    (["{tmp}/notbench.json"], "not an edgec bench result"),
])
def test_bad_report_input(results, tmp_path, args, fragment):
    (tmp_path / "notbench.json").write_text('{"hello": 1}')
    args = [a.format(r=results[0], tmp=tmp_path) for a in args]
    result = run("report", results[0], *args, "--no-chart")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.output


def test_merged_rounds_pool_samples_and_recompute_medians(results):
    from devices.report import merge_runs

    one = json.loads(results[0].read_text())
    slow = copy.deepcopy(one)
    for entry in slow["by_depth"]:
        entry["samples"]["decode_s"] = [s * 100 for s in entry["samples"]["decode_s"]]
    merged = merge_runs([one, one, slow])
    assert merged["spec"]["repeats"] == 9 and merged["rounds"] == 3
    steps = one["spec"]["new_tokens"] - 1
    for entry, original in zip(merged["by_depth"], one["by_depth"]):
        assert len(entry["samples"]["decode_s"]) == 9
        # a median: 6 of the 9 samples are the fast run's twice, so the 100x slower run cannot move it out
        fast = [steps / s for s in original["samples"]["decode_s"]]
        assert min(fast) <= entry["decode_tokens_per_s"] <= max(fast)
    assert merged["decode_tokens_per_s"] == merged["by_depth"][0]["decode_tokens_per_s"]


def test_merged_rounds_keep_the_most_huge_pages_and_refuse_mixed_settings(results):
    from compiler.errors import UsageError
    from devices.report import merge_runs

    one = json.loads(results[0].read_text())
    on = [{**one, "huge_pages_mb": mb, "device": {**one["device"], "huge_pages": True}} for mb in (12.0, 40.0)]
    assert merge_runs(on)["huge_pages_mb"] == 40.0
    off = {**one, "huge_pages_mb": 0.0, "device": {**one["device"], "huge_pages": False}}
    with pytest.raises(UsageError, match="--no-huge-pages"):
        merge_runs([on[0], off])
