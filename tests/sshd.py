"""A real OpenSSH sshd on a loopback port, standing in for a Raspberry Pi: generated host and user keys, an
authorized_keys file in a temporary directory, this machine's Python as the device's interpreter."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # sshd refuses to re-exec itself unless started by an absolute path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgec-test", "-f", str(path)], check=True)
    return path


@dataclass
class Sshd:
    url: str
    port: int
    identity: Path  # in authorized_keys
    stranger: Path  # a key the server does not know
    known_hosts: Path
    dir: Path
    process: subprocess.Popen

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes (children of the listener)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True, check=False)
        return [int(p) for p in out.stdout.split()]


def sshd_unavailable() -> str | None:
    if not os.path.exists(SSHD):
        return f"{SSHD} is not installed (the Makefile installs Debian's openssh-server when it can)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "the OpenSSH client (ssh, ssh-keygen) is not installed"
    return None


def start_sshd(directory: Path) -> Sshd:
    directory.mkdir(parents=True, exist_ok=True)
    host_key = keygen(directory / "host_ed25519")
    identity = keygen(directory / "user_ed25519")
    stranger = keygen(directory / "stranger_ed25519")
    (directory / "authorized_keys").write_text((directory / "user_ed25519.pub").read_text())
    if os.geteuid() == 0:
        # sshd running as root insists on its privilege-separation directory.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = directory / "sshd.log"
    for _ in range(5):  # the port may be taken between free_port() and sshd's bind
        port = free_port()
        config = directory / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress 127.0.0.1:{port}",
            f"HostKey {host_key}",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            f"PidFile {directory / 'sshd.pid'}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {getpass.getuser()}",
            "MaxStartups 50",
            "LogLevel VERBOSE",
            "",
        ]))
        with open(log, "ab") as log_file:
            process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log_file,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        if process.poll() is None:
            break
    else:
        raise RuntimeError(f"sshd did not start: {log.read_text()[-500:]}")
    known_hosts = directory / "known_hosts"
    public = (directory / "host_ed25519.pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:{port} {public[0]} {public[1]}\n")
    return Sshd(f"ssh://{getpass.getuser()}@127.0.0.1:{port}", port, identity, stranger, known_hosts, directory,
                process)


def stop_sshd(sshd: Sshd) -> None:
    try:
        os.killpg(sshd.process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    sshd.process.wait(10)
