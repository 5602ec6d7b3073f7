"""`edgec validate --device`: the build's gates on a device, against the golden data the bundle carries, in
a fresh process on this machine and over ssh to a real sshd on loopback (this machine's Python standing in
for the device's)."""

import json
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from compiler.cli import main
from runtimes.validation import GOLDEN_FILE, load_golden
from tests.sshd import sshd_unavailable, start_sshd, stop_sshd


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(validated_bundle, tmp_path_factory):
    """A copy of the session's validated bundle: device validation records its verdicts in the manifest."""
    return Path(shutil.copytree(validated_bundle, tmp_path_factory.mktemp("device-validation") / "bundle"))


def test_the_bundle_carries_the_references_logits_and_greedy_tokens(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert GOLDEN_FILE in manifest["files"]
    golden = load_golden(bundle / GOLDEN_FILE)
    prompts = manifest["validation"]["prompts"]
    assert [len(ids) for ids in golden["prompts"]] == [p["prompt_tokens"] for p in prompts]
    assert all(logits.shape == (len(ids), manifest["model"]["vocab_size"])
               for ids, logits in zip(golden["prompts"], golden["logits"]))
    assert all(len(tokens) == manifest["validation"]["new_tokens"] for tokens in golden["tokens"])
    # The host's own validation read the same golden data: its metrics are the ones the build recorded.
    assert manifest["validation"]["metrics"]["greedy_match"] == 1.0


def test_validation_on_the_local_device_records_its_verdict(bundle):
    result = run("validate", bundle, "--device", "local", "--json")
    assert result.exit_code == 0, result.output
    [verdict] = json.loads(result.stdout)
    assert verdict["passed"] and verdict["format"] == "onnx"
    assert verdict["device"]["arch"] == platform.machine() and verdict["runtime"]["name"] == "onnxruntime"
    host = json.loads((bundle / "manifest.json").read_text())["validation"]["metrics"]
    # Same artifact, same runtime, same machine: the device's metrics are the build's.
    assert verdict["metrics"]["max_abs_logits"] == pytest.approx(host["max_abs_logits"], rel=1e-3, abs=1e-6)
    recorded = json.loads((bundle / "manifest.json").read_text())["device_validation"]
    assert [(v["device"]["name"], v["format"], v["passed"]) for v in recorded] == [("local", "onnx", True)]
    again = run("validate", bundle, "--device", "local", "--json")  # replaces, not appends
    assert again.exit_code == 0 and len(json.loads((bundle / "manifest.json").read_text())["device_validation"]) == 1


def test_a_gate_failing_on_the_device_is_one_line_and_exit_1(bundle):
    result = run("validate", bundle, "--device", "local", "--gate", "max_abs_logits=1e-12", "--quiet")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "max_abs_logits" in lines[0] and "on local" in lines[0], result.stderr


def test_a_bundle_without_golden_data_says_how_to_get_it(tiny_bundle):
    result = run("validate", tiny_bundle, "--device", "local")
    assert result.exit_code == 2 and "--no-validate" in result.stderr and "Traceback" not in result.output


def test_validation_over_ssh_needs_only_the_runtime_and_numpy(bundle, tmp_path_factory):
    reason = sshd_unavailable()
    if reason:
        pytest.skip(reason)
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        device_dir = tmp_path_factory.mktemp("device")
        result = run("validate", bundle, "--device", server.url, "--identity", server.identity,
                     "--known-hosts", server.known_hosts, "--remote-python", sys.executable, "--remote-dir",
                     device_dir, "--json")
    finally:
        stop_sshd(server)
    assert result.exit_code == 0, result.output
    [verdict] = json.loads(result.stdout)
    assert verdict["passed"] and verdict["device"]["kind"] == "ssh" and verdict["device"]["name"] == server.url
    assert verdict["metrics"]["greedy_match"] == 1.0 and np.isfinite(verdict["metrics"]["kl_mean"])
    assert not list((device_dir / "runs").iterdir())  # the run directory went with the run
