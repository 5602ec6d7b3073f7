"""The emulated aarch64 device: a Debian arm64 root run by qemu-user through binfmt_misc, with its sshd on
loopback, so `--device emulator` runs a bundle in aarch64 onnxruntime on a machine without ARM hardware.

Under the edgec cache directory ($EDGEC_CACHE or ~/.cache/edgec), in emulator/:

    root-<recipe>.tar.zst    the finished root (debootstrap + python3 + sshd + PyPI's aarch64 wheels), built
                             once (minutes) and restored by every `up` (seconds)
    root/                    the running root, made fresh by `up` and removed by `down`
    id_ed25519, host_ed25519 the client key and the guest's host key, kept across ups
    known_hosts, state.json  written by `up`: port, CPU, pid, key, known_hosts, root
    cpuinfo-<cpu>            the aarch64 /proc/cpuinfo bound into the root for that CPU

Emulated code runs 35-400x slower than native: its figures say whether a bundle runs and what it computes
on that CPU, never how fast the device is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from compiler.errors import EdgecError, UsageError
from devices.ssh import SshDevice
from runtimes.base import arm64_hwcap_features

CPUS = ("cortex-a72", "cortex-a76", "max")  # Pi 4 (no dot product), Pi 5 and phones, everything qemu has
SUITE = "bookworm"
GUEST_PYTHON = "3.11"  # bookworm's python3: the wheels are fetched for it
GUEST_PACKAGES = ("python3", "openssh-server")
# onnxruntime's and genai's own dependencies are pinned with them, fetched one by one with --no-deps because
# pip would evaluate their markers for the host.
WHEELS = ("onnxruntime==1.32.0", "onnxruntime-genai==0.18.0", "numpy==2.4.6", "flatbuffers==25.12.19",
          "protobuf==7.36.2", "packaging==26.4")
# pip takes only the tags listed: with manylinux2014 alone it picks an old onnxruntime (1.16).
WHEEL_PLATFORMS = (*(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)), "manylinux2014_aarch64",
                   "linux_aarch64")
GUEST_SITE = f"usr/local/lib/python{GUEST_PYTHON}/dist-packages"  # on Debian's python3 path, not apt's
GUEST_USER_PYTHON = "/usr/bin/python3"
SSHD_CONFIG = "etc/ssh/edgec_sshd_config"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# MIDR fields for the generated /proc/cpuinfo (what a real board shows); qemu's `max` has no real part.
MIDR = {"cortex-a72": ("0x41", "0x0", "0xd08", "3"), "cortex-a76": ("0x41", "0x4", "0xd0b", "1"),
        "max": ("0x00", "0x0", "0x051", "0")}
START_TIMEOUT_S = 60  # sshd and a first onnxruntime import under emulation


def _cache_dir() -> Path:
    from compiler.config import default_cache_dir

    return default_cache_dir() / "emulator"


def recipe_key() -> str:
    """Names the root tarball after what went into it, so a changed recipe builds a new one."""
    recipe = json.dumps([SUITE, GUEST_PACKAGES, WHEELS, WHEEL_PLATFORMS, GUEST_SITE])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


class Paths:
    def __init__(self, base: Path | None = None):
        self.base = base or _cache_dir()
        self.tarball = self.base / f"root-{recipe_key()}.tar.zst"
        self.root = self.base / "root"
        self.build = self.base / "build"
        self.key = self.base / "id_ed25519"
        self.host_key = self.base / "host_ed25519"
        self.known_hosts = self.base / "known_hosts"
        self.state = self.base / "state.json"
        self.log = self.base / "sshd.log"

    def cpuinfo(self, cpu: str) -> Path:
        return self.base / f"cpuinfo-{cpu}"


def _run(command: list, what: str, timeout_s: float | None = None, env: dict | None = None, log=None) -> str:
    """Run a host command; a failure is one line naming the step and the command's last words."""
    try:
        proc = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout_s,
                              env=env, check=False)
    except subprocess.TimeoutExpired:
        raise EdgecError(f"emulator: {what} took more than {timeout_s:.0f} s") from None
    except FileNotFoundError:
        raise EdgecError(f"emulator: {what}: {command[0]} is not installed") from None
    if proc.returncode != 0:
        last = ((proc.stderr.strip() or proc.stdout.strip()).splitlines() or ["no message"])[-1]
        raise EdgecError(f"emulator: {what} failed (exit {proc.returncode}): {last[:200]}")
    return proc.stdout


def _guest_env(cpu: str) -> dict:
    # qemu-user reads QEMU_CPU at each exec of an aarch64 binary, so it picks the CPU of every guest process.
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
            "HOME": "/root", "QEMU_CPU": cpu, "DEBIAN_FRONTEND": "noninteractive"}


# -- what the host needs ------------------------------------------------------------------------------------

def unavailable() -> str | None:
    """Why the emulator cannot run here (one line with what to do), or None. Mounts binfmt_misc and enables
    qemu-aarch64 when it can."""
    if sys.platform != "linux":
        return "the emulator needs Linux (qemu-user and binfmt_misc)"
    if os.geteuid() != 0:
        return "the emulator needs root (chroot, mounts, binfmt_misc); run edgec emulator as root"
    for tool, package in (("debootstrap", "debootstrap"), ("zstd", "zstd"), ("update-binfmts", "binfmt-support"),
                          ("qemu-aarch64-static", "qemu-user-static"), ("ssh-keygen", "openssh-client")):
        if shutil.which(tool) is None:
            return (f"{tool} is not installed; install it: apt-get install qemu-user-static binfmt-support "
                    "debootstrap zstd openssh-client")
    if not (BINFMT / "register").exists():
        proc = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            return (f"binfmt_misc cannot be mounted at {BINFMT} ({proc.stderr.strip()[:80] or 'no message'}); "
                    "a container needs it from its host (e.g. docker --privileged)")
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        proc = subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0 or not entry.exists():
            return (f"qemu-aarch64 could not be registered with binfmt_misc ({proc.stderr.strip()[:80]}); "
                    "reinstall qemu-user-static and binfmt-support")
    if "F" not in next((line.split()[1] for line in entry.read_text().splitlines() if line.startswith("flags:")), ""):
        return f"{entry} lacks the F flag, so qemu is not found inside a chroot; reinstall qemu-user-static"
    return None


def _require_host() -> None:
    reason = unavailable()
    if reason:
        raise EdgecError(f"emulator: {reason}")


def apt_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses here (sources.list or deb822 .sources), for debootstrap."""
    candidates = []
    for path in [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list")),
                 *sorted((sources / "sources.list.d").glob("*.sources"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split("#")[0].split()
            if path.suffix == ".sources" and words[:1] == ["URIs:"]:
                candidates += words[1:]
            elif words[:1] == ["deb"]:
                candidates += [w for w in words[1:] if "://" in w][:1]
    for uri in candidates:
        if "security" not in uri and ("debian" in uri or "/deb" in uri):
            return uri
    return "http://deb.debian.org/debian"


# -- mounts and processes inside the root ---------------------------------------------------------------------

def mounts_under(root: Path) -> list[str]:
    """Mount points at or below root, deepest first (so they can be unmounted in that order)."""
    prefix = str(root.resolve()) if root.exists() else str(root)
    found = []
    with open("/proc/mounts") as f:
        for line in f:
            # /proc/mounts writes a space, tab, newline and backslash in octal
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=lambda p: (p.count("/"), p), reverse=True)


def _unmount_all(root: Path) -> None:
    for point in mounts_under(root):
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)  # busy: detach it
    left = mounts_under(root)
    if left:
        raise EdgecError(f"emulator: {left[0]} is still mounted; stop what uses it and run edgec emulator down")


def processes_in(root: Path) -> list[int]:
    """PIDs whose root directory is `root`: the guest's sshd, its sessions and whatever they started."""
    target = str(root.resolve()) if root.exists() else str(root)
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.readlink(f"/proc/{entry}/root") == target:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _stop_processes(root: Path, grace_s: float = 5) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = processes_in(root)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            for pid in pids:  # reap our own children (the sshd an in-process `up` started)
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            pids = processes_in(root)
            time.sleep(0.1)
        if not pids:
            return


def _remove_root(root: Path) -> None:
    """Remove a root: only once nothing is mounted in it, else rmtree would go through /dev into the host's."""
    if not root.exists():
        return
    _stop_processes(root)
    _unmount_all(root)
    shutil.rmtree(root)


def _mount_guest(root: Path) -> None:
    for args in (["-t", "proc", "proc", root / "proc"], ["--rbind", "/sys", root / "sys"],
                 ["--make-rslave", root / "sys"], ["--rbind", "/dev", root / "dev"], ["--make-rslave", root / "dev"]):
        _run(["mount", *args], f"mount {' '.join(map(str, args))}")


# -- the root ------------------------------------------------------------------------------------------------

def _fetch_wheels(site: Path, log) -> None:
    """PyPI's aarch64 wheels, fetched and unpacked on the host into the guest's site-packages: pip under
    emulation would take minutes for the same files."""
    log(f"fetching aarch64 wheels for Python {GUEST_PYTHON}: {', '.join(WHEELS)}")
    platforms = [arg for tag in WHEEL_PLATFORMS for arg in ("--platform", tag)]
    for wheel in WHEELS:
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
              "--python-version", GUEST_PYTHON, "--implementation", "cp", *platforms, "--target", site,
              "--upgrade", wheel], f"fetching the aarch64 wheel {wheel}", timeout_s=600)


def build_root(paths: Paths, log) -> float:
    """Debootstrap an arm64 Debian with python3, sshd and the wheels; pack it as paths.tarball. Seconds."""
    started = time.monotonic()
    paths.base.mkdir(parents=True, exist_ok=True)
    _remove_root(paths.build)
    root = paths.build / "root"
    root.parent.mkdir(parents=True)
    mirror = apt_mirror()
    try:
        log(f"building the emulated aarch64 root (once; a few minutes): debootstrap {SUITE} arm64 from {mirror}")
        _run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", f"--include={','.join(GUEST_PACKAGES)}",
              SUITE, root, mirror], "debootstrap (first stage)", timeout_s=1200)
        # Keeps the packages' scripts from starting services (sshd) inside the chroot.
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        log("debootstrap second stage (emulated)")
        _run(["chroot", root, "/debootstrap/debootstrap", "--second-stage"], "debootstrap (second stage, emulated)",
             timeout_s=1800, env=_guest_env("cortex-a76"))
        version = _run(["chroot", root, GUEST_USER_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                       "running the guest's python3", timeout_s=120, env=_guest_env("cortex-a76")).strip()
        if version != GUEST_PYTHON:
            raise EdgecError(f"emulator: the guest's python3 is {version}, the wheels are for {GUEST_PYTHON}; "
                             "update GUEST_PYTHON and WHEELS in devices/emulator.py")
        _fetch_wheels(root / GUEST_SITE, log)
        _unmount_all(root)  # the second stage mounts proc and sys; tar must not descend into them
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        log("packing the root")
        partial = paths.tarball.with_suffix(".partial")
        _run(["tar", "--one-file-system", "--numeric-owner", "-I", "zstd -T0 -3", "-cf", partial, "-C", root, "."],
             "packing the root", timeout_s=600)
        partial.rename(paths.tarball)
    finally:
        _stop_processes(root)
        _unmount_all(root)
        if not mounts_under(paths.build):
            shutil.rmtree(paths.build, ignore_errors=True)
    return time.monotonic() - started


def ensure_root(paths: Paths | None = None, log=None) -> Path:
    """The cached root tarball, built first if there is none for this recipe."""
    log = log or (lambda message: None)
    _require_host()
    paths = paths or Paths()
    if not paths.tarball.exists():
        seconds = build_root(paths, log)
        log(f"built the root in {seconds:.0f} s: {paths.tarball}")
    return paths.tarball


def _restore_root(paths: Paths, log) -> None:
    ensure_root(paths, log)
    _remove_root(paths.root)
    paths.root.mkdir(parents=True)
    _run(["tar", "--numeric-owner", "-I", "zstd -T0", "-xpf", paths.tarball, "-C", paths.root], "restoring the root",
         timeout_s=600)


# -- CPU ------------------------------------------------------------------------------------------------------

READ_HWCAPS = ("import struct; d = open('/proc/self/auxv', 'rb').read(); "
               "a = dict(struct.iter_unpack('=QQ', d[:len(d) // 16 * 16])); print(a.get(16, 0), a.get(26, 0))")


def guest_features(root: Path, cpu: str) -> list[str]:
    """The HWCAP features qemu gives the guest on this CPU, read in the guest (needs its /proc mounted)."""
    out = _run(["chroot", root, GUEST_USER_PYTHON, "-c", READ_HWCAPS], f"reading the HWCAPs of {cpu}",
               timeout_s=120, env=_guest_env(cpu))
    hwcap, hwcap2 = (int(x) for x in out.split())
    return arm64_hwcap_features(hwcap, hwcap2)


def cpuinfo_text(cpu: str, features: list[str], count: int) -> str:
    """An aarch64 /proc/cpuinfo: qemu-user shows the guest the host's x86 one, and onnxruntime's cpuinfo
    parser crashes on that."""
    implementer, variant, part, revision = MIDR.get(cpu, MIDR["max"])
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {' '.join(features)}\nCPU implementer\t: {implementer}\n"
             f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {revision}\n")
    return "".join(f"processor\t: {n}\n{block}\n" for n in range(count))


# -- up, down, status -------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    if not path.exists():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], f"ssh-keygen {path}")


def _sshd_config(port: int) -> str:
    return "\n".join([
        f"ListenAddress 127.0.0.1:{port}",
        "HostKey /etc/ssh/edgec_host_ed25519",
        "AuthorizedKeysFile /root/.ssh/authorized_keys",
        "PidFile none",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "MaxStartups 20",
        "",
    ])


def read_state(paths: Paths | None = None) -> dict | None:
    """The running emulator's state (port, cpu, pid, key, known_hosts, root), or None when it is not up."""
    paths = paths or Paths()
    try:
        state = json.loads(paths.state.read_text())
        os.kill(state["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    # The pid alone could be reused by another process: up means its root is the emulator's root.
    try:
        if os.readlink(f"/proc/{state['pid']}/root") != str(Path(state["root"]).resolve()):
            return None
    except OSError:
        return None
    return state


def _start_sshd(paths: Paths, cpu: str, port: int) -> subprocess.Popen:
    root = paths.root
    _keygen(paths.key, "edgec-emulator")
    _keygen(paths.host_key, "edgec-emulator-host")
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh / "authorized_keys").write_text(paths.key.with_suffix(".pub").read_text())
    (ssh / "authorized_keys").chmod(0o600)
    shutil.copy(paths.host_key, root / "etc/ssh/edgec_host_ed25519")
    (root / "etc/ssh/edgec_host_ed25519").chmod(0o600)
    (root / SSHD_CONFIG).write_text(_sshd_config(port))
    (root / "run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(paths.log, "ab") as log_file:
        # SetEnv puts QEMU_CPU into every session, so what a session starts runs on that CPU too.
        return subprocess.Popen(["chroot", str(root), "/usr/sbin/sshd", "-D", "-e", "-f", f"/{SSHD_CONFIG}",
                                 "-o", f"SetEnv=QEMU_CPU={cpu}"], stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, env=_guest_env(cpu), start_new_session=True)


def _wait_for_guest(paths: Paths, process: subprocess.Popen, port: int, cpu: str) -> str:
    """Until an ssh session on the guest imports onnxruntime; its answer (arch, version)."""
    device = EmulatorDevice({"port": port, "cpu": cpu, "key": str(paths.key), "known_hosts": str(paths.known_hosts)})
    command = device.ssh_command(f"{GUEST_USER_PYTHON} -c 'import platform, onnxruntime; "
                                 "print(platform.machine(), onnxruntime.__version__)'")
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (paths.log.read_text(errors="replace").strip().splitlines() or ["no message"])[-1]
            raise EdgecError(f"emulator: the guest's sshd exited (status {process.returncode}) on port {port}: "
                             f"{tail[:160]}; is the port free? try --port")
        proc = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)
        if proc.returncode == 0:
            return proc.stdout.strip()
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        if proc.returncode != 255:  # sshd answered: the guest's python failed, waiting will not help
            break
        time.sleep(0.5)
    raise EdgecError(f"emulator: the guest on port {port} did not run onnxruntime: {last[:160]} "
                     f"(sshd log: {paths.log})")


def up(cpu: str = "cortex-a76", port: int = 0, log=None) -> dict:
    """Restore (or build) the root, mount it, start its sshd on 127.0.0.1:port; the state. Nothing stays
    mounted or running when it fails."""
    log = log or (lambda message: None)
    if cpu not in CPUS:
        raise UsageError(f"--cpu {cpu}: expected one of {', '.join(CPUS)}")
    _require_host()
    paths = Paths()
    state = read_state(paths)
    if state:
        raise UsageError(f"the emulator is already up ({state['cpu']} on port {state['port']}); "
                         "run edgec emulator down first")
    started = time.monotonic()
    port = port or _free_port()
    _restore_root(paths, log)
    try:
        _mount_guest(paths.root)
        features = guest_features(paths.root, cpu)
        paths.cpuinfo(cpu).write_text(cpuinfo_text(cpu, features, os.cpu_count() or 1))
        _run(["mount", "--bind", paths.cpuinfo(cpu), paths.root / "proc/cpuinfo"], "binding the aarch64 /proc/cpuinfo")
        host_key = paths.host_key.with_suffix(".pub")
        process = _start_sshd(paths, cpu, port)
        public = host_key.read_text().split()
        paths.known_hosts.write_text(f"[127.0.0.1]:{port} {public[0]} {public[1]}\n")
        answer = _wait_for_guest(paths, process, port, cpu)
        state = {"pid": process.pid, "port": port, "cpu": cpu, "root": str(paths.root), "key": str(paths.key),
                 "known_hosts": str(paths.known_hosts), "python": GUEST_USER_PYTHON, "features": features,
                 "guest": answer, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        paths.state.write_text(json.dumps(state, indent=2) + "\n")
    except BaseException:
        paths.state.unlink(missing_ok=True)
        _remove_root(paths.root)
        raise
    state["seconds"] = time.monotonic() - started
    return state


def down(log=None) -> bool:
    """Stop the guest's processes, unmount everything, remove the running root; False if it was not up."""
    log = log or (lambda message: None)
    paths = Paths()
    was_up = read_state(paths) is not None
    if paths.root.exists() or mounts_under(paths.root):
        if os.geteuid() != 0:
            raise EdgecError("emulator: stopping it needs root (its mounts); run edgec emulator down as root")
        _remove_root(paths.root)
    paths.state.unlink(missing_ok=True)
    return was_up


def status() -> dict | None:
    return read_state()


class EmulatorDevice(SshDevice):
    """The running emulator, reached like any ssh device with the key and known_hosts `up` wrote."""

    kind = "emulator"

    def __init__(self, state: dict, memory_cap_mb: float = 0):
        super().__init__(f"ssh://root@127.0.0.1:{state['port']}", identity=Path(state["key"]),
                         known_hosts=Path(state["known_hosts"]), remote_python=GUEST_USER_PYTHON,
                         memory_cap_mb=memory_cap_mb)
        self.cpu = state["cpu"]
        self.name = f"emulator ({self.cpu})"

    def describe(self, facts):
        return {**facts, "name": self.name, "kind": "emulator", "emulated_cpu": self.cpu,
                "note": "emulated by qemu-user: speeds are not the device's"}


def emulator_device(memory_cap_mb: float = 0) -> EmulatorDevice:
    """--device emulator: the emulator `edgec emulator up` started."""
    state = read_state()
    if state is None:
        raise EdgecError("--device emulator: the emulator is not up; run edgec emulator up (as root) first")
    return EmulatorDevice(state, memory_cap_mb)
