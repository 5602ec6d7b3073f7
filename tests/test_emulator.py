"""The emulated aarch64 device, for real: qemu-user, a Debian arm64 root, its own sshd, PyPI's aarch64
onnxruntime. The root is built once into the edgec cache directory (minutes on a fresh machine) and restored
by each `up` (seconds); one `up` per CPU."""

import json
import shutil
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.cli import main
from devices import emulator as emu
from runtimes.base import arm64_hwcap_features

FAST = ["--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--warmup", "0"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, code):
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def host_ready():
    reason = emu.unavailable()
    if reason:
        pytest.skip(reason)
    if emu.status():
        pytest.skip("an emulator is already up; run edgec emulator down before the tests")


@pytest.fixture(scope="module", params=["cortex-a76", "cortex-a72"])
def emulator(request, host_ready):
    root = emu.Paths().root
    started = run("emulator", "up", "--cpu", request.param)
    assert started.exit_code == 0, started.output
    yield request.param
    run("emulator", "down")
    assert emu.mounts_under(root) == [] and not root.exists()


def test_a_failed_up_leaves_nothing_mounted(host_ready):
    """sshd cannot bind a port that is taken: `up` fails after mounting, and undoes it. (First in the file:
    it runs before the module's emulator is up.)"""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(run("emulator", "up", "--cpu", "cortex-a76", "--port", port), 1)
    assert "sshd" in line and str(port) in line
    root = emu.Paths().root
    assert emu.mounts_under(root) == [] and not root.exists() and emu.status() is None


def test_bench_on_the_emulator_reports_aarch64_and_its_features(emulator, tiny_bundle):
    result = run("bench", tiny_bundle, "--device", "emulator", *FAST, "--json")
    assert result.exit_code == 0, result.output
    device = json.loads(result.stdout)["device"]
    assert device["arch"] == "aarch64" and device["kind"] == "emulator" and device["emulated_cpu"] == emulator
    assert device["runtimes"]["onnxruntime"] == "1.32.0"
    assert "asimd" in device["cpu_features"]
    # The dot product is what decides onnxruntime's int4 path: a Pi 5's Cortex-A76 has it, a Pi 4's A72 not.
    assert ("asimddp" in device["cpu_features"]) == (emulator == "cortex-a76")


@pytest.fixture(scope="module")
def validated_bundles(validated_bundle, trained_dir, tmp_path_factory):
    """An fp32 and a default int4 (GPTQ) bundle, and one with an fp32 prompt graph, each carrying its reference's
    golden data (copies: device validation records its verdicts in the manifest)."""
    fp32 = Path(shutil.copytree(validated_bundle, tmp_path_factory.mktemp("emulated-fp32") / "bundle"))
    bundles = {"fp32": fp32}
    for name, extra in (("int4", []), ("int4-prompt-graph", ["--prompt-accuracy-level", "1"])):
        bundles[name] = tmp_path_factory.mktemp(f"emulated-{name}") / "bundle"
        result = run("build", "--model", trained_dir, "--out", bundles[name], "--quiet", "--new-tokens", "6",
                     "--quant", "int4", *extra)
        assert result.exit_code == 0, result.output
    return bundles


@pytest.mark.parametrize("precision", ["fp32", "int4", "int4-prompt-graph"])
def test_bundles_pass_their_gates_on_the_emulated_cpu(emulator, validated_bundles, precision):
    """The build's gates, run in aarch64 onnxruntime on that CPU (on a Cortex-A72, int4 MatMulNBits computes in
    fp32, unlike x86 and the A76), and the verdict recorded in the manifest with the device's features."""
    bundle = validated_bundles[precision]
    result = run("validate", bundle, "--device", "emulator", "--json")
    assert result.exit_code == 0, result.output
    [verdict] = json.loads(result.stdout)
    assert verdict["passed"] and verdict["device"]["arch"] == "aarch64" and verdict["device"]["kind"] == "emulator"
    assert ("asimddp" in verdict["device"]["cpu_features"]) == (emulator == "cortex-a76")
    assert verdict["runtime"].get("prompt_graph") == ("model_prompt.onnx" if precision == "int4-prompt-graph" else None)
    recorded = json.loads((bundle / "manifest.json").read_text())["device_validation"]
    assert any(v["device"]["arch"] == "aarch64" and v["passed"] for v in recorded)


def test_status_names_the_cpu_and_port(emulator):
    state = emu.status()
    result = run("emulator", "status")
    assert result.exit_code == 0 and f"{emulator} on 127.0.0.1:{state['port']}" in result.stdout


def test_a_second_up_is_refused_in_one_line(emulator):
    assert "already up" in one_line_error(run("emulator", "up", "--cpu", emulator), 2)


def test_down_unmounts_everything(emulator):
    root = emu.Paths().root
    assert emu.mounts_under(root)  # proc, sys, dev and the cpuinfo while up
    result = run("emulator", "down")
    assert result.exit_code == 0 and "emulator down" in result.stdout
    assert emu.mounts_under(root) == [] and not root.exists() and emu.status() is None
    assert "not up" in one_line_error(run("bench", "unused", "--device", "emulator", *FAST), 1)


def test_bench_on_an_emulator_that_is_not_up(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path))
    line = one_line_error(run("bench", tiny_bundle, "--device", "emulator", *FAST), 1)
    assert "run edgec emulator up" in line


def test_hwcap_bits_name_the_kernels_features():
    assert arm64_hwcap_features(1 << 1 | 1 << 20, 1 << 13 | 1 << 23) == ["asimd", "asimddp", "i8mm", "sme"]


def test_generated_cpuinfo_is_aarch64_style():
    text = emu.cpuinfo_text("cortex-a72", ["fp", "asimd"], 2)
    assert text.count("processor\t:") == 2 and "Features\t: fp asimd" in text and "CPU part\t: 0xd08" in text
