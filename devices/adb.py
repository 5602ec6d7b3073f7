"""An Android phone over adb (`--device adb` or `adb:SERIAL`), running the edgec demo app (android-demo/).

The phone runs no Python: the app carries the runtimes (ExecuTorch, ONNX Runtime) and the bench and
self-test logic (android-demo/core). The host drives it through the `adb` command line, as ExecuTorch's
benchmark app is driven:

    /data/local/tmp/edgec/bundles/<manifest sha256[:16]>/   the bundle, pushed once; its sha256 checked there
    am start -n org.edgec.demo/.BenchmarkActivity --es mode bench|selftest --es bundle_dir ... --es output NAME
    run-as org.edgec.demo cat files/NAME                     the result, polled for under --timeout

The app writes the result JSON to NAME.tmp and renames it, so a file that exists is whole. A bench result is
the edgec.bench/1 schema; a self-test result is what `python -m runtimes.validation` prints (metrics,
prompts, runtime, device), and the host applies the gates (devices/validate.py).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from compiler.errors import EdgecError, UsageError
from devices.base import Device
from runtimes.base import KERNEL_FEATURES
from runtimes.registry import RUNTIMES

APP_PACKAGE = "org.edgec.demo"
BENCH_ACTIVITY = ".BenchmarkActivity"
DEVICE_ROOT = "/data/local/tmp/edgec"
# The record of a bundle's files whose sha256 the phone has checked: later runs skip pushing them.
VERIFIED_RECORD = ".edgec-verified"
SHORT_CALL_S = 60  # probe, checks, cleanup
POLL_S = 0.5


def parse_adb_url(url: str) -> str | None:
    """adb -> None (the one attached device, or $ANDROID_SERIAL); adb:SERIAL -> SERIAL."""
    if url == "adb":
        return os.environ.get("ANDROID_SERIAL") or None
    serial = url[len("adb:"):]
    if not url.startswith("adb:") or not serial or serial.startswith("-") or any(c.isspace() for c in serial):
        raise UsageError(f"--device {url}: expected adb or adb:SERIAL (a serial from `adb devices`)")
    return serial


def parse_devices(output: str) -> list[tuple[str, str, dict]]:
    """`adb devices -l` -> [(serial, state, {product, model, device, transport_id})]."""
    devices = []
    for line in output.splitlines():
        if not line.strip() or line.startswith(("List of devices", "*")):
            continue
        serial, _, rest = line.partition("\t") if "\t" in line else line.partition(" ")
        words = rest.split()
        if not words:
            continue
        details = dict(w.split(":", 1) for w in words[1:] if ":" in w)
        devices.append((serial.strip(), words[0], details))
    return devices


def parse_sections(output: str) -> dict[str, str]:
    """The probe's output: sections opened by `@@name` lines."""
    sections, name = {}, None
    for line in output.splitlines():
        if line.startswith("@@"):
            name = line[2:].strip()
            sections[name] = ""
        elif name:
            sections[name] += line + "\n"
    return sections


def _meminfo_mb(text: str) -> dict:
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("MemTotal", "MemAvailable") and value.split():
            values[key] = int(value.split()[0]) // 1024
    return {"mem_total_mb": values.get("MemTotal"), "mem_available_mb": values.get("MemAvailable")}


def _df_free_mb(text: str) -> int | None:
    """toybox `df -k DIR`: a header, then Filesystem 1K-blocks Used Available Use% Mounted-on."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 4 and fields[3].isdigit():
            return int(fields[3]) // 1024
    return None


def _cpu_facts(text: str) -> dict:
    """arm64 /proc/cpuinfo: 'Features' lines; a 'Hardware' line names the SoC on many phones."""
    features, model, processors = set(), None, 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "processor" and value.strip().isdigit():
            processors += 1
        elif key in ("features", "flags"):
            features.update(value.split())
        elif key in ("hardware", "model name") and value.strip() and model is None:
            model = value.strip()
    return {"cpu_model": model, "cpu_features": [f for f in KERNEL_FEATURES if f in features],
            "cpu_count": processors or None}


def _app_version(dumpsys: str) -> str | None:
    """`dumpsys package PKG` lists versionName=... for an installed package and nothing for another."""
    for line in dumpsys.splitlines():
        if "versionName=" in line:
            return line.split("versionName=", 1)[1].split()[0]
    return None


class AdbDevice(Device):
    kind = "adb"
    disk_hint = ("free storage on the phone (old bundles: adb shell rm -r /data/local/tmp/edgec/bundles)")

    def __init__(self, url: str = "adb", memory_cap_mb: float = 0, package: str = APP_PACKAGE):
        self.requested = parse_adb_url(url)
        self.serial: str | None = None
        self.name = url if self.requested is None or url != "adb" else f"adb:{self.requested}"
        self.package = package
        self.memory_cap_mb = memory_cap_mb
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.result_name = f"edgec-{self.run_id}.json"
        self.pushed_dir: str | None = None  # a bundle directory this run created, removed if the run fails
        self.pushed: list[str] = []  # files this run pushed beside a bundle's checked ones
        self.pushed_into = ""

    # -- adb plumbing ------------------------------------------------------------------------------------

    def _adb(self, *args: str, during: str, timeout_s: float = SHORT_CALL_S, check: bool = True):
        if shutil.which("adb") is None:
            raise EdgecError(f"{self.name}: no adb on PATH; install Android's platform-tools (Debian: apt-get install adb)")
        command = ["adb", *(["-s", self.serial] if self.serial else []), *args]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise EdgecError(f"{self.name}: adb gave no answer within {timeout_s:.0f} s during the {during}; "
                             "unplug and replug the phone, or run `adb kill-server`") from None
        if check and proc.returncode != 0:
            raise self._error(proc.stdout + proc.stderr, during, proc.returncode)
        return proc

    def _shell(self, command: str, during: str, timeout_s: float = SHORT_CALL_S, check: bool = True):
        return self._adb("shell", command, during=during, timeout_s=timeout_s, check=check)

    def _error(self, output: str, during: str, returncode: int) -> EdgecError:
        text = " ".join(output.split())
        lower = text.lower()
        if "unauthorized" in lower:
            return EdgecError(f"{self.name}: the phone has not authorized this computer; unlock it and accept the "
                              "'Allow USB debugging?' prompt, then run again")
        if "offline" in lower:
            return EdgecError(f"{self.name}: the phone is offline; unplug and replug it (or `adb reconnect`)")
        if "no space left" in lower:
            return EdgecError(f"{self.name}: the phone's storage is full during the {during}; {self.disk_hint}")
        if "not found" in lower and ("device" in lower or "emulator" in lower):
            return EdgecError(f"{self.name}: the phone is gone (unplugged?) during the {during}: {text[:120]}")
        return EdgecError(f"{self.name}: adb failed during the {during} (exit {returncode}): {text[:160] or 'no message'}")

    def _select(self) -> None:
        """Pick the phone from `adb devices -l`: the one asked for, or the only one attached."""
        proc = self._adb("devices", "-l", during="device listing")
        devices = parse_devices(proc.stdout)
        if self.requested:
            match = [d for d in devices if d[0] == self.requested]
            if not match:
                attached = ", ".join(d[0] for d in devices) or "none"
                raise EdgecError(f"{self.name}: no phone with serial {self.requested} (attached: {attached}); "
                                 "see `adb devices`")
        else:
            if not devices:
                raise EdgecError(f"{self.name}: no phone attached; plug one in with USB debugging on (see `adb devices`)")
            if len(devices) > 1:
                raise EdgecError(f"{self.name}: {len(devices)} phones attached "
                                 f"({', '.join(d[0] for d in devices)}); pick one with --device adb:SERIAL")
            match = devices
        serial, state, details = match[0]
        self.serial, self.details = serial, details
        self.name = f"adb:{serial}"
        if state == "unauthorized":
            raise self._error("unauthorized", "device listing", 1)
        if state == "offline":
            raise self._error("offline", "device listing", 1)
        if state != "device":
            raise EdgecError(f"{self.name}: the phone is in state '{state}', not ready; wait for it to boot")

    # -- the Device protocol -----------------------------------------------------------------------------

    def bundle_dir(self, bundle_key: str) -> str:
        return f"{DEVICE_ROOT}/bundles/{bundle_key}"

    def probe(self, bundle_key, expected):
        self._select()
        directory = self.bundle_dir(bundle_key)
        script = "; ".join([
            "echo @@model", "getprop ro.product.model", "echo @@abi", "getprop ro.product.cpu.abi",
            "echo @@release", "getprop ro.build.version.release", "echo @@meminfo", "cat /proc/meminfo",
            "echo @@cpuinfo", "cat /proc/cpuinfo", "echo @@df", f"mkdir -p {DEVICE_ROOT} && df -k {DEVICE_ROOT}",
            "echo @@app", f"dumpsys package {shlex.quote(self.package)} | grep versionName",
            "echo @@verified", f"cat {shlex.quote(directory + '/' + VERIFIED_RECORD)} 2>/dev/null", "true"])
        sections = parse_sections(self._shell(script, "probe").stdout)
        version = _app_version(sections.get("app", ""))
        if version is None:
            raise EdgecError(f"{self.name}: the edgec demo app ({self.package}) is not installed; build and install it "
                             "from android-demo/ (Android Studio, or ./gradlew :app:installRelease)")
        facts = {
            "model": sections.get("model", "").strip() or None,
            "arch": sections.get("abi", "").strip() or None,
            "os": f"Android {sections.get('release', '').strip()}",
            **_cpu_facts(sections.get("cpuinfo", "")),
            **_meminfo_mb(sections.get("meminfo", "")),
            "disk_free_mb": _df_free_mb(sections.get("df", "")),
            "app": {"package": self.package, "version": version},
            # The app carries every runtime edgec runs: the preflight's runtime check passes on it.
            "runtimes": {package: f"in {self.package} {version}" for entry in RUNTIMES.values()
                         for package in entry.packages},
        }
        if facts["cpu_model"] is None:
            facts["cpu_model"] = facts["model"]
        recorded = {}
        for line in sections.get("verified", "").splitlines():
            digest, _, name = line.partition("  ")
            recorded[name.strip()] = digest.strip()
        cached = [name for name, (_, digest) in expected.items() if recorded.get(name) == digest]
        return facts, cached

    def stage(self, bundle_dir, bundle_key, expected, cached, runtime, log):
        """Push the missing files in one `adb push`, then check every file's sha256 on the phone (toybox
        sha256sum) and record them, so the next run pushes nothing."""
        directory = self.bundle_dir(bundle_key)
        missing = [name for name in expected if name not in cached]
        log(f"pushing {len(missing)} bundle files ({sum(expected[n][0] for n in missing) / 1e6:.1f} MB) to "
            f"{self.name}, {len(cached)} already there")
        if missing:
            if not cached:
                self.pushed_dir = directory  # all of it is this run's: a failure removes the directory
            self.pushed, self.pushed_into = missing, directory
            self._shell(f"mkdir -p {shlex.quote(directory)}", "push")
            self._adb("push", *(str(Path(bundle_dir) / name) for name in missing), directory + "/",
                      during="push", timeout_s=max(SHORT_CALL_S, sum(expected[n][0] for n in missing) / 5e6))
        names = " ".join(shlex.quote(name) for name in expected)
        out = self._shell(f"cd {shlex.quote(directory)} && sha256sum {names}", "sha256 check").stdout
        found = {}
        for line in out.splitlines():
            digest, _, name = line.partition("  ")
            found[name.strip()] = digest.strip()
        mismatched = [name for name, (_, digest) in expected.items() if found.get(name) != digest]
        if mismatched:
            raise EdgecError(f"{bundle_dir}: {', '.join(mismatched)} has a sha256 on {self.name} other than manifest.json "
                             "records; the bundle changed since its build, or the copy broke: rebuild it, run again")
        record = "\n".join(f"{expected[name][1]}  {name}" for name in expected)
        self._shell(f"printf '%s\\n' {shlex.quote(record)} > {shlex.quote(directory + '/' + VERIFIED_RECORD)}",
                    "sha256 check")
        self.pushed_dir, self.pushed = None, []  # whole and checked: it stays for the next run
        return directory

    def run(self, runtime, bundle_path, agent_args, timeout_s, keep):
        """Start the app's BenchmarkActivity (mode bench, or selftest for `edgec validate`) and poll for its
        result file under --timeout."""
        extras = self._extras(runtime, agent_args)
        extras += ["--es", "bundle_dir", bundle_path, "--es", "output", self.result_name,
                   "--ei", "memory_cap_mb", str(int(self.memory_cap_mb))]
        component = f"{self.package}/{BENCH_ACTIVITY}"
        started = time.monotonic()
        answer = self._shell(" ".join(shlex.quote(a) for a in ["am", "start", "-W", "-n", component, *extras]),
                             "app start").stdout
        if "Error" in answer:  # am reports a missing activity on stdout with exit status 0
            raise EdgecError(f"{self.name}: the app did not start: {' '.join(answer.split())[:160]}; reinstall it "
                             "from android-demo/")
        while True:
            proc = self._shell(f"run-as {self.package} cat files/{self.result_name}", "result read", check=False)
            if proc.returncode == 0 and proc.stdout.strip():
                break
            if "unknown package" in proc.stderr + proc.stdout:
                raise EdgecError(f"{self.name}: {self.package} disappeared during the run (uninstalled?)")
            if timeout_s and time.monotonic() - started > timeout_s:
                self.cleanup(keep)
                return {"status": "timeout", "seconds": time.monotonic() - started}
            time.sleep(POLL_S)
        seconds = time.monotonic() - started
        if not keep:
            self._shell(f"run-as {self.package} rm -f files/{self.result_name}", "cleanup", check=False)
        try:
            result = json.loads(proc.stdout)
        except ValueError:
            return {"status": "error", "returncode": 1, "seconds": seconds,
                    "stderr": f"unreadable result: {proc.stdout[:120]!r}"}
        if "error" in result:  # the app's own one-line failure (bundle unreadable, engine refused it)
            return {"status": "error", "returncode": 1, "seconds": seconds, "stderr": str(result["error"])}
        return {"status": "ok", "seconds": seconds, "stdout": proc.stdout}

    def _extras(self, runtime: str, agent_args: list) -> list:
        """The agent's command line (BenchSpec.to_args(), or the validation's --format/--threads) as intent extras."""
        formats = {entry.module: fmt for fmt, entry in RUNTIMES.items()}
        values = dict(zip(agent_args[::2], agent_args[1::2]))
        if runtime == "validation":
            return ["--es", "mode", "selftest", "--es", "format", values["--format"],
                    "--ei", "threads", values.get("--threads", "0")]
        extras = ["--es", "mode", "bench", "--es", "format", formats[runtime]]
        for option in ("--prompt-tokens", "--new-tokens", "--repeats", "--warmup", "--threads"):
            extras += ["--ei", option[2:].replace("-", "_"), values[option]]
        return extras + ["--es", "depths", values["--depths"]]

    def cleanup(self, keep):
        """Stop the app's run and remove its result; a bundle this run pushed but did not finish checking goes."""
        if self.serial is None:
            return
        self._shell(f"am force-stop {self.package}", "cleanup", check=False)
        if not keep:
            self._shell(f"run-as {self.package} rm -f files/{self.result_name} files/{self.result_name}.tmp",
                        "cleanup", check=False)
            if self.pushed_dir:
                self._shell(f"rm -rf {shlex.quote(self.pushed_dir)}", "cleanup", check=False)
            elif self.pushed:  # beside files checked by earlier runs: only this run's go
                self._shell(f"cd {shlex.quote(self.pushed_into)} && rm -f "
                            + " ".join(shlex.quote(n) for n in self.pushed), "cleanup", check=False)

    def describe(self, facts):
        return {**facts, "name": self.name, "kind": "adb"}
