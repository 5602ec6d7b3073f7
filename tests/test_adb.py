"""The adb device (`--device adb[:SERIAL]`) for edgec bench and validate.

No phone can be attached here: every test runs against tests/adb_standin.py, a stand-in `adb` on PATH that
plays phones over a local directory with adb's command lines, messages and exit statuses, and whose demo
app runs the real edgec runtime on the pushed bundle."""

from __future__ import annotations

import json
import shutil
import stat
import sys
import time
from pathlib import Path

import pytest

from compiler.cli import main
from tests.test_device import one_line_error, run

STANDIN = Path(__file__).with_name("adb_standin.py")
FAST = ["--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--warmup", "0"]
PHONE = {"serial": "R58M123ABC", "state": "device", "model": "Pixel 8", "abi": "arm64-v8a", "release": "14"}
CPUINFO = "".join(f"processor\t: {i}\nFeatures\t: fp asimd aes pmull sha1 sha2 crc32 atomics asimddp i8mm bf16\n\n"
                  for i in range(8)) + "Hardware\t: Tensor G3\n"


class Phones:
    """The stand-in's state: the attached phones, the app, the storage."""

    def __init__(self, root: Path):
        self.root = root

    def set(self, devices=(PHONE,), app_installed=True, **flags):
        self.root.joinpath("state.json").write_text(json.dumps({"devices": list(devices), **flags}))
        for device in devices:
            base = self.root / "fs" / device["serial"]
            (base / "proc").mkdir(parents=True, exist_ok=True)
            (base / "proc/meminfo").write_text("MemTotal:        7824564 kB\nMemAvailable:    3512000 kB\n")
            (base / "proc/cpuinfo").write_text(CPUINFO)
            app = base / "data/data/org.edgec.demo"
            if app_installed:
                (app / "files").mkdir(parents=True, exist_ok=True)
            elif app.exists():
                shutil.rmtree(app)

    def bundles(self, serial=PHONE["serial"]) -> list[Path]:
        return sorted((self.root / "fs" / serial / "data/local/tmp/edgec/bundles").glob("*"))

    def results(self, serial=PHONE["serial"]) -> list[str]:
        return sorted(p.name for p in (self.root / "fs" / serial / "data/data/org.edgec.demo/files").glob("*"))


@pytest.fixture
def phones(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    adb = bin_dir / "adb"
    adb.write_text(f"#!/bin/sh\nexec {sys.executable} {STANDIN} \"$@\"\n")
    adb.chmod(adb.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("ADB_STANDIN", str(tmp_path / "adb"))
    monkeypatch.delenv("ANDROID_SERIAL", raising=False)
    phones = Phones(tmp_path / "adb")
    phones.root.mkdir()
    phones.set()
    return phones


@pytest.fixture
def bundle(validated_bundle, tmp_path):
    """A copy: edgec validate records its verdict in the bundle's manifest."""
    return Path(shutil.copytree(validated_bundle, tmp_path / "bundle"))


def test_bench_over_adb_pushes_once_checks_and_cleans_up(phones, bundle):
    """Against the stand-in adb (no phone can be attached here)."""
    first = run("bench", bundle, "--device", "adb", "--json", *FAST, "--depths", "0,8")
    assert first.exit_code == 0, first.output
    files = len(json.loads((bundle / "manifest.json").read_text())["files"]) + 1  # and manifest.json itself
    assert f"pushing {files} bundle files" in first.stderr, first.stderr
    result = json.loads(first.stdout)
    assert result["schema"] == "edgec.bench/1" and len(result["by_depth"]) == 2
    device = result["device"]
    assert device["name"] == f"adb:{PHONE['serial']}" and device["kind"] == "adb"
    assert device["arch"] == "arm64-v8a" and device["os"] == "Android 14" and device["cpu_count"] == 8
    assert device["cpu_model"] == "Tensor G3" and "asimddp" in device["cpu_features"] and "i8mm" in device["cpu_features"]
    assert device["mem_available_mb"] == 3429 and device["app"] == {"package": "org.edgec.demo", "version": "0.1.0"}
    [pushed] = phones.bundles()
    assert pushed.name == result["bundle"]["manifest_sha256"][:16] and (pushed / "model.onnx").exists()
    assert phones.results() == []  # the result file is read and removed

    again = run("bench", bundle, "--device", f"adb:{PHONE['serial']}", *FAST)
    assert again.exit_code == 0, again.output
    assert "pushing 0 bundle files" in again.stderr
    assert "decode (4 tokens)" in again.stdout and "adb:R58M123ABC (arm64-v8a, 8 CPUs)" in again.stdout


def test_validate_over_adb_applies_the_gates_here(phones, bundle):
    """Against the stand-in adb (no phone can be attached here): the app's self-test gives the metrics."""
    result = run("validate", bundle, "--device", "adb", "--format", "onnx")
    assert result.exit_code == 0, result.output
    assert f"on adb:{PHONE['serial']}, arm64-v8a, asimd asimddp i8mm bf16): PASSED" in result.stdout
    assert "max_abs_logits = " in result.stdout
    manifest = json.loads((bundle / "manifest.json").read_text())
    [verdict] = manifest["device_validation"]
    assert verdict["device"]["kind"] == "adb" and verdict["passed"] and verdict["runtime"]["name"] == "onnxruntime"
    assert phones.results() == []


@pytest.mark.parametrize("setup, fragment", [
    (dict(devices=[]), "no phone attached"),
    (dict(devices=[PHONE, {**PHONE, "serial": "emulator-5554"}]), "2 phones attached (R58M123ABC, emulator-5554); "
                                                                    "pick one with --device adb:SERIAL"),
    (dict(devices=[{**PHONE, "state": "unauthorized"}]), "accept the 'Allow USB debugging?' prompt"),
    (dict(devices=[{**PHONE, "state": "offline"}]), "the phone is offline"),
    (dict(app_installed=False), "the edgec demo app (org.edgec.demo) is not installed"),
    (dict(disk_full=True), "1 MB to push but only 0 MB free on the device's disk; free storage on the phone"),
    (dict(push_fills_disk=True), "the phone's storage is full during the push; free storage on the phone"),
])
def test_adb_faults_are_one_line_and_leave_nothing(phones, bundle, setup, fragment):
    """Against the stand-in adb (no phone can be attached here)."""
    phones.set(**setup)
    result = run("bench", bundle, "--device", "adb", "--quiet", *FAST)
    assert fragment in one_line_error(result, 1)
    assert phones.bundles() == []  # a refused or failed push leaves no bundle behind


def test_unknown_serial(phones, bundle):
    """Against the stand-in adb (no phone can be attached here)."""
    result = run("bench", bundle, "--device", "adb:NOPE", "--quiet", *FAST)
    assert "no phone with serial NOPE (attached: R58M123ABC)" in one_line_error(result, 1)


def test_adb_run_past_timeout_is_stopped(phones, bundle):
    """Against the stand-in adb (no phone can be attached here): the app hangs; --timeout stops it."""
    phones.set(app_hangs=True)
    started = time.monotonic()
    result = run("bench", bundle, "--device", "adb", "--timeout", "2", "--quiet", *FAST)
    assert "ran past --timeout 2 s" in one_line_error(result, 1)
    assert time.monotonic() - started < 30
    app = phones.root / "fs" / PHONE["serial"] / "data/data/org.edgec.demo"
    assert not (app / "running.pid").exists() and phones.results() == []  # force-stopped, nothing left
    assert len(phones.bundles()) == 1  # the checked bundle stays for the next run


@pytest.mark.parametrize("command", ["bench", "validate"])
def test_help_shows_the_adb_device(command):
    result = run(command, "--help")
    assert "adb[:SERIAL]" in result.output and "Android phone over adb" in " ".join(result.output.split())


def test_bad_adb_url():
    from compiler.errors import UsageError
    from devices.bench import make_device

    with pytest.raises(UsageError, match="expected adb or adb:SERIAL"):
        make_device("adb:")
