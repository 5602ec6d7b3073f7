"""`edgec ci`: a recipe of one model with one adapter and two targets, built for real, reported, cached, on
local processes and on a real local Ray instance."""

import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.cli import main

RECIPE = """\
[[model]]
name = "tiny"
path = "{model}"
adapters = ["{adapter}"]

[[target]]
name = "onnx-plain"
format = "onnx"
optimize = "none"

[[target]]
name = "onnx-fused"
format = "onnx"
optimize = "fuse"
"""

STRICT_TARGET = """
[[target]]
name = "onnx-strict"
format = "onnx"
optimize = "none"
gate = ["max_abs_logits=1e-12"]
"""


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_recipe(directory: Path, model: Path, adapter: Path, extra: str = "") -> Path:
    path = directory / "recipe.toml"
    path.write_text(RECIPE.format(model=model, adapter=adapter) + extra)
    return path


def outcomes(out: Path) -> list[tuple]:
    """What two runs of one recipe must agree on: targets, whether each built, and every gate's verdict."""
    results = json.loads((out / "results.json").read_text())["targets"]
    return sorted((r["model"], r["target"], r["status"] != "error", r["validation"],
                   tuple((g["format"], g["metric"], g["passed"]) for g in r["gates"])) for r in results)


def junit_cases(out: Path) -> dict[tuple[str, str], ET.Element]:
    root = ET.parse(out / "junit.xml").getroot()
    return {(case.get("classname"), case.get("name")): case for case in root.iter("testcase")}


@pytest.fixture(scope="module")
def first_run(llama_dir, llama_adapter, tmp_path_factory):
    work = tmp_path_factory.mktemp("ci")
    recipe = write_recipe(work, llama_dir, llama_adapter)
    started = time.monotonic()
    result = run("ci", recipe, "--out", work / "out", "--cache", work / "cache")
    return work, recipe, result, time.monotonic() - started


def test_recipe_builds_bundles_and_reports(first_run):
    work, _, result, _ = first_run
    assert result.exit_code == 0, result.output
    assert "ray" not in sys.modules, "the local executor must run without Ray installed"
    out = work / "out"
    for target in ("onnx-plain", "onnx-fused"):
        manifest = json.loads((out / "tiny" / target / "manifest.json").read_text())
        assert manifest["validation"]["passed"]
        assert manifest["source"]["adapters"], "the adapter was merged"
    cases = junit_cases(out)
    for target in ("onnx-plain", "onnx-fused"):
        assert ("tiny." + target, "build") in cases
        gate_cases = [name for classname, name in cases if classname == "tiny." + target and name != "build"]
        assert "onnx:max_abs_logits" in gate_cases and "onnx:lora_delta_retention" in gate_cases
    assert not any(case.find("failure") is not None or case.find("error") is not None for case in cases.values())
    summary = (out / "summary.md").read_text()
    assert "## tiny" in summary and "| onnx-plain |" in summary and "| onnx-fused |" in summary
    assert "**PASSED**" in summary


def test_unchanged_rerun_is_served_from_the_cache(first_run):
    work, recipe, first, first_s = first_run
    assert first.exit_code == 0, first.output
    started = time.monotonic()
    second = run("ci", recipe, "--out", work / "out2", "--cache", work / "cache")
    second_s = time.monotonic() - started
    assert second.exit_code == 0, second.output
    statuses = {r["target"]: r["status"] for r in json.loads((work / "out2" / "results.json").read_text())["targets"]}
    assert statuses == {"onnx-plain": "cached", "onnx-fused": "cached"}
    assert second_s < first_s / 5, (first_s, second_s)
    assert outcomes(work / "out2") == outcomes(work / "out")
    assert (work / "out2" / "summary.md").read_text().count("| cached |") == 2


def test_bench_and_regression_against_a_baseline(first_run):
    """[bench] benches each bundle (served from the first run's cache) and fails on a slowdown past the margin
    against a baseline results.json: here one whose onnx-plain decoded impossibly fast."""
    work, recipe, first, _ = first_run
    assert first.exit_code == 0, first.output
    baseline = work / "baseline"
    baseline.mkdir()
    (baseline / "results.json").write_text(json.dumps({"targets": [
        {"model": "tiny", "target": "onnx-plain", "bench": [{"device": "local", "decode_tok_s": 1e9}]}]}))
    benched = work / "benched.toml"
    benched.write_text(recipe.read_text() + '\n[bench]\ndevices = ["local"]\nbaseline = "baseline"\n'
                       'fail_if_slower = "10%"\nprompt_tokens = 8\nnew_tokens = 8\nrepeats = 1\n')
    result = run("ci", benched, "--out", work / "out-bench", "--cache", work / "cache")
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("edgec: error: ci: 1 failed: tiny/onnx-plain slower on local")
    targets = {r["target"]: r for r in json.loads((work / "out-bench" / "results.json").read_text())["targets"]}
    assert targets["onnx-fused"]["bench"][0]["decode_tok_s"] > 0
    assert targets["onnx-plain"]["bench"][0]["regression"]
    cases = junit_cases(work / "out-bench")
    assert cases[("tiny.onnx-plain", "bench:local")].find("failure") is not None
    assert cases[("tiny.onnx-fused", "bench:local")].find("failure") is None
    assert "tok/s" in (work / "out-bench" / "summary.md").read_text()


def test_changed_adapter_changes_the_key(llama_dir, llama_adapter, tmp_path):
    import shutil

    from compiler.ci.cache import target_key

    copy = tmp_path / "adapter"
    shutil.copytree(llama_adapter, copy)
    options = {"format": "onnx", "optimize": "none"}
    assert target_key(llama_dir, [str(copy)], options, None) == target_key(llama_dir, [str(llama_adapter)], options, None)
    config = copy / "adapter_config.json"
    config.write_text(config.read_text().replace("{", "{ ", 1))
    assert target_key(llama_dir, [str(copy)], options, None) != target_key(llama_dir, [str(llama_adapter)], options, None)
    assert target_key(llama_dir, [str(llama_adapter)], {**options, "optimize": "fuse"}, None) != \
        target_key(llama_dir, [str(llama_adapter)], options, None)


def test_recipe_keeps_runtime_adapter_names(llama_dir, llama_adapter, tmp_path):
    from compiler.ci.recipe import load

    (tmp_path / "lora").symlink_to(llama_adapter)
    path = tmp_path / "recipe.toml"
    path.write_text(f'[[model]]\nname = "m"\npath = "{llama_dir}"\nadapters = ["a=lora", "b=lora:0.5", "lora"]\n'
                    '[[target]]\nname = "t"\nlora = "runtime"\n')
    model = load(path).models[0]
    assert model.adapters == [f"a={tmp_path / 'lora'}", f"b={tmp_path / 'lora'}:0.5", str(tmp_path / "lora")]


def test_gate_failure_fails_the_run_and_the_others_still_build(llama_dir, llama_adapter, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[[model]]\nname = "tiny"\npath = "{llama_dir}"\nadapters = ["{llama_adapter}"]\n'
                      + STRICT_TARGET + '\n[[target]]\nname = "onnx-plain"\nformat = "onnx"\noptimize = "none"\n')
    result = run("ci", recipe, "--out", tmp_path / "out", "--no-cache")
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("edgec: error: ci: 1 failed: tiny/onnx-strict onnx gate max_abs_logits"), message
    assert (tmp_path / "out" / "tiny" / "onnx-plain" / "manifest.json").is_file()
    cases = junit_cases(tmp_path / "out")
    failure = cases[("tiny.onnx-strict", "onnx:max_abs_logits")].find("failure")
    assert failure is not None and "must be at most 1e-12" in failure.get("message")
    assert cases[("tiny.onnx-strict", "onnx:rel_l2_logits")].find("failure") is None
    assert cases[("tiny.onnx-plain", "onnx:max_abs_logits")].find("failure") is None


@pytest.mark.parametrize("target_line, line, key", [
    ('blok_size = 32', 8, "blok_size"),              # a typo: not a build option
    ('quant = "int5"', 8, "quant"),                  # a bad value, caught by the build command's own choices
    ('out = "elsewhere"', 8, "out"),                 # ci decides where bundles go
    ('gate = ["max_abs_logit=1"]', 8, "gate"),       # an unknown gate metric
])
def test_bad_recipe_is_one_line_naming_file_line_and_key(llama_dir, tmp_path, target_line, line, key):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[[model]]\nname = "tiny"\npath = "{llama_dir}"\n\n'
                      f'[[target]]\nname = "x"\nformat = "onnx"\n{target_line}\n')
    result = run("ci", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"edgec: error: {recipe}:{line}: {key}:"), lines[0]
    assert not (tmp_path / "out").exists()


def test_unknown_model_key(llama_dir, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[[model]]\nname = "tiny"\npath = "{llama_dir}"\nadaptors = []\n\n[[target]]\nname = "x"\n')
    result = run("ci", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.strip() == (f"edgec: error: {recipe}:4: adaptors: unknown key in [[model]] "
                                     f"(known: adapters, name, path)")


def assert_rebuilt_with_the_same_report(first_run, name: str, *options):
    """Another executor, no cache: both targets built again, with the first run's outcomes and junit cases."""
    work, recipe, first, _ = first_run
    assert first.exit_code == 0, first.output
    result = run("ci", recipe, "--out", work / name, "--no-cache", *options)
    assert result.exit_code == 0, result.output
    statuses = {r["target"]: r["status"] for r in json.loads((work / name / "results.json").read_text())["targets"]}
    assert statuses == {"onnx-plain": "built", "onnx-fused": "built"}
    assert outcomes(work / name) == outcomes(work / "out")
    assert set(junit_cases(work / name)) == set(junit_cases(work / "out"))


def test_jobs_build_in_local_processes_with_the_same_report(first_run):
    assert_rebuilt_with_the_same_report(first_run, "out-jobs", "--jobs", "2")


def test_ray_executor_gives_the_same_report(first_run):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'edgec[ci]'")
    assert_rebuilt_with_the_same_report(first_run, "out-ray", "--executor", "ray")


def test_ray_retries_a_target_whose_worker_is_killed_mid_build(llama_dir, tmp_path):
    """SIGKILL the Ray worker while it builds (its pid is in the bundle's staging folder name): the task is
    retried and the run still completes with a validated bundle."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'edgec[ci]'")
    import os
    import signal
    import threading

    from compiler.ci.main import run_ci

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[[model]]\nname = "tiny"\npath = "{llama_dir}"\n\n'
                      '[[target]]\nname = "onnx-plain"\nformat = "onnx"\noptimize = "none"\n')
    out = tmp_path / "out"
    outcome = {}

    def ci():
        try:
            outcome["value"] = run_ci(recipe, out, executor="ray", log=lambda line: None)
        except Exception as e:  # surfaced by the assertions below
            outcome["error"] = e

    thread = threading.Thread(target=ci, daemon=True)  # a hung Ray run fails the test, not the session
    thread.start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        for staging in (out / "tiny").glob(".onnx-plain.edgec-staging-*") if (out / "tiny").is_dir() else ():
            killed = int(staging.name.rpartition("-")[2])
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed is not None, "the build finished before its worker could be killed"
    assert "error" not in outcome, outcome.get("error")
    [result] = outcome["value"]["results"]
    assert result["status"] == "built" and result["validation"] == "passed", result
    assert json.loads((out / "tiny" / "onnx-plain" / "manifest.json").read_text())["validation"]["passed"]


@pytest.fixture
def ray_cluster(monkeypatch):
    """A Ray head and a second node started with `ray start` on loopback, stopped by their process groups."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'edgec[ci]'")
    import os
    import shutil
    import signal
    import socket
    import subprocess

    ray_cli = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    with socket.socket() as probe:  # a free port for the head's GCS
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    # A throwaway cluster on loopback: no token (Ray 2.60's head turns token auth on unless told not to,
    # and then the second node and this driver would need the token file under ~/.ray).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    nodes = [subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--include-dashboard=false", *common], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        import ray

        deadline = time.monotonic() + 120
        joined = False
        while time.monotonic() < deadline:
            if len(nodes) == 1 and subprocess.run([ray_cli, "status", f"--address={address}"],
                                                  capture_output=True).returncode == 0:
                nodes.append(subprocess.Popen([ray_cli, "start", f"--address={address}", *common],
                                              start_new_session=True, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
            if len(nodes) == 2:
                ray.init(address=address, log_to_driver=False)
                alive = [n for n in ray.nodes() if n["Alive"]]
                ray.shutdown()
                if len(alive) == 2:
                    joined = True
                    break
            time.sleep(1)
        assert joined, "the two Ray nodes did not come up"
        yield address
    finally:
        for node in reversed(nodes):  # each node's ray start, raylet, GCS and workers share its process group
            try:
                os.killpg(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for node in reversed(nodes):
            try:
                node.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            try:  # the GCS can outlive a terminated ray start
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_ray_cluster_of_two_nodes_gives_the_same_report(first_run, ray_cluster):
    """--ray-address: the targets run on a two-node cluster started with `ray start`, same report."""
    assert_rebuilt_with_the_same_report(first_run, "out-cluster", "--executor", "ray", "--ray-address", ray_cluster)
