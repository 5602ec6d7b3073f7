#!/usr/bin/env python3
"""A stand-in for Android's `adb` (no phone can be attached here): it plays phones over a local directory.

$ADB_STANDIN (a directory) holds state.json: {"devices": [{"serial", "state", "model", "abi", "release"}],
"app_hangs", "disk_full" (df says 0 free), "push_fills_disk" (df
says plenty, a push fails)} and each phone's files under fs/<serial>/ (its
/data/local/tmp, the app's data directory, /proc/meminfo and /proc/cpuinfo). Command lines, messages and
exit statuses follow adb's: `adb devices -l`, `adb [-s SERIAL] shell CMD` (the command's own exit status,
shell protocol v2), `adb push SRC... DST`, "error: no devices/emulators found", "error: more than one
device/emulator", "error: device unauthorized.", "error: device offline", "error: device 'X' not found".

`shell` runs the command in /bin/sh with the phone's paths mapped into fs/<serial>/ and its Android tools
(getprop, dumpsys, df, am, run-as) as shell functions. The app's BenchmarkActivity runs the real edgec
runtime on the pushed bundle (`python -m runtimes.ort` for a bench, `runtimes.validation` for a self-test)
and writes its JSON as the app does: to NAME.tmp, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(os.environ["ADB_STANDIN"])
PACKAGE = "org.edgec.demo"


def state() -> dict:
    return json.loads((ROOT / "state.json").read_text())


def phone_dir(serial: str) -> Path:
    return ROOT / "fs" / serial


def fail(message: str, code: int = 1):
    print(message, file=sys.stderr)
    sys.exit(code)


def pick(serial: str | None) -> dict:
    devices = state()["devices"]
    serial = serial or os.environ.get("ANDROID_SERIAL")
    if serial:
        match = [d for d in devices if d["serial"] == serial]
        if not match:
            fail(f"error: device '{serial}' not found")
        device = match[0]
    elif not devices:
        fail("error: no devices/emulators found")
    elif len(devices) > 1:
        fail("error: more than one device/emulator")
    else:
        device = devices[0]
    if device["state"] == "unauthorized":
        fail("error: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\n"
             "Try 'adb kill-server' if that seems wrong.\nOtherwise check for a confirmation dialog on your device.")
    if device["state"] == "offline":
        fail("error: device offline")
    return device


def local(serial: str, path: str) -> Path:
    return phone_dir(serial) / path.lstrip("/")


def shell(device: dict, command: str) -> int:
    serial, st = device["serial"], state()
    base = phone_dir(serial)
    (base / "data/local/tmp").mkdir(parents=True, exist_ok=True)
    app_dir = base / "data/data" / PACKAGE
    df_free_kb = 0 if st.get("disk_full") else 8_000_000
    prelude = f"""
getprop() {{ case "$1" in ro.product.model) echo '{device["model"]}';; ro.product.cpu.abi) echo '{device["abi"]}';;
  ro.build.version.release) echo '{device["release"]}';; esac; }}
dumpsys() {{ if [ "$1" = package ] && [ -d '{app_dir}' ]; then echo "Packages:"; echo "  Package [$2]";
  echo "    versionCode=1 minSdk=28 targetSdk=34"; echo "    versionName=0.1.0"; fi; }}
df() {{ echo "Filesystem     1K-blocks    Used Available Use% Mounted on";
  echo "/dev/block/dm-5 100000000 {100000000 - df_free_kb} {df_free_kb} 50% /data"; }}
am() {{ "{sys.executable}" "{__file__}" --app "{serial}" "$@"; }}
run_as() {{ if [ "$1" != {PACKAGE} ] || [ ! -d '{app_dir}' ]; then echo "run-as: unknown package: $1" >&2; return 1; fi;
  shift; ( cd '{app_dir}' && "$@" ); }}
"""
    # The phone's absolute paths live under fs/<serial>/; run-as is not a valid shell function name.
    mapped = (command.replace("/data/local/tmp", str(base / "data/local/tmp"))
              .replace("/proc/", str(base / "proc") + "/").replace("run-as ", "run_as "))
    return subprocess.run(["/bin/sh", "-c", prelude + mapped], check=False).returncode


def push(device: dict, args: list) -> int:
    *sources, destination = args
    for source in sources:
        target = local(device["serial"], destination)
        target = target / Path(source).name if destination.endswith("/") or target.is_dir() else target
        if state().get("disk_full") or state().get("push_fills_disk"):
            target.write_bytes(Path(source).read_bytes()[:10])  # a partial file, as a full disk leaves
            fail(f"adb: error: failed to copy '{source}' to '{destination}{Path(source).name}': remote No space "
                 "left on device")
        if not target.parent.is_dir():
            fail(f"adb: error: failed to copy '{source}' to '{destination}': remote secure_mkdirs() failed: "
                 "No such file or directory")
        shutil.copyfile(source, target)
    print(f"{len(sources)} files pushed, 0 skipped.")
    return 0


def app(serial: str, args: list) -> int:
    """`am start -W -n PKG/.BenchmarkActivity --es/--ei KEY VALUE...` and `am force-stop PKG`."""
    app_dir = phone_dir(serial) / "data/data" / PACKAGE
    pid_file = app_dir / "running.pid"
    if args[0] == "force-stop":
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), 9)
            except ProcessLookupError:
                pass
            pid_file.unlink()
        return 0
    component = args[args.index("-n") + 1]
    if not app_dir.is_dir():
        print(f"Starting: Intent {{ cmp={component} }}")
        print(f"Error type 3\nError: Activity class {{{component}}} does not exist.")
        return 0  # am says so on stdout and exits 0
    extras, i = {}, 0
    while i < len(args):
        if args[i] in ("--es", "--ei"):
            extras[args[i + 1]] = args[i + 2]
            i += 3
        else:
            i += 1
    bundle = extras["bundle_dir"]  # already mapped into fs/<serial>/ by shell() when it came through `adb shell`
    bundle = bundle if bundle.startswith(str(ROOT)) else str(phone_dir(serial) / bundle.lstrip("/"))
    if state().get("app_hangs"):
        command = [sys.executable, "-c", "import time; time.sleep(3600)"]
    elif extras["mode"] == "selftest":
        command = [sys.executable, "-m", "runtimes.validation", bundle, "--format", extras["format"],
                   "--threads", extras["threads"]]
    else:
        command = [sys.executable, "-m", f"runtimes.{'ort' if extras['format'] == 'onnx' else 'executorch'}", bundle,
                   *(x for key in ("prompt_tokens", "new_tokens", "repeats", "warmup", "threads", "depths")
                     for x in (f"--{key.replace('_', '-')}", extras[key]))]
    out = app_dir / "files" / extras["output"]
    out.parent.mkdir(exist_ok=True)
    # The activity's thread: the result file appears whole (written to .tmp, then renamed).
    script = (f"import subprocess, os, json, sys\n"
              f"p = subprocess.run({command!r}, capture_output=True, text=True)\n"
              f"text = p.stdout if p.returncode == 0 else json.dumps({{'error': (p.stderr.strip().splitlines() or ['failed'])[-1]}})\n"
              f"open({str(out) + '.tmp'!r}, 'w').write(text)\n"
              f"os.replace({str(out) + '.tmp'!r}, {str(out)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parents[1],
                            stderr=subprocess.DEVNULL)
    pid_file.write_text(str(proc.pid))
    print(f"Starting: Intent {{ cmp={component} }}\nStatus: ok\nLaunchState: COLD\nActivity: {component}\nWaitTime: 120\nComplete")
    return 0


def main(argv: list) -> int:
    if argv[:1] == ["--app"]:
        return app(argv[1], argv[2:])
    serial = None
    if argv[:1] == ["-s"]:
        serial, argv = argv[1], argv[2:]
    if argv[:2] == ["devices", "-l"]:
        print("List of devices attached")
        for d in state()["devices"]:
            details = f" product:{d['model'].lower()} model:{d['model'].replace(' ', '_')} device:{d['model'].lower()} transport_id:1" \
                if d["state"] == "device" else " transport_id:1"
            print(f"{d['serial']}\t{d['state']}{details}")
        print()
        return 0
    device = pick(serial)
    if argv[0] == "shell":
        return shell(device, " ".join(argv[1:]))
    if argv[0] == "push":
        return push(device, argv[1:])
    fail(f"adb stand-in: {argv[0]} is not played here")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
