"""Devices a bundle is benchmarked on: this machine (optionally as a constrained profile) or one over ssh.

A device answers a probe (facts for the preflight, and which bundle files it already holds), stages a
bundle, and runs a runtime's bench agent under a time limit and a memory cap. What to run and what the
answers mean is compiler/bench.py's business.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from runtimes.agent import run_capped
from runtimes.base import device_facts

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Profile:
    """A device emulated on this machine: its thread count and a cap on resident memory. The CPU speed
    stays this machine's, so speeds under a profile are not the device's speeds."""

    name: str
    threads: int
    memory_cap_mb: int
    emulates: str


# Memory caps are what one app can hold on the device after the OS and its services, not its RAM size.
PROFILES = {
    "rpi4": Profile("rpi4", 4, 1600, "Raspberry Pi 4, 2 GB board (4x Cortex-A72)"),
    "rpi5": Profile("rpi5", 4, 3400, "Raspberry Pi 5, 4 GB board (4x Cortex-A76)"),
    "phone-midrange": Profile("phone-midrange", 4, 2500,
                              "mid-range Android phone, 6 GB (4 big cores; the low-memory killer's budget "
                              "for one foreground app)"),
}


class Device:
    """What bench needs from a device; see LocalDevice and runtimes.ssh.SshDevice."""

    name = "device"
    memory_cap_mb: float = 0  # 0: none beyond the device's free memory
    threads: int = 0  # 0: the bench spec decides

    def probe(self, bundle_key: str, expected: dict) -> tuple[dict, list]:
        """(device facts, names of the expected bundle files the device already holds)."""
        raise NotImplementedError

    def stage(self, bundle_dir: Path, bundle_key: str, expected: dict, cached: list, runtime: str, log) -> str:
        """Make the bundle and the runtime's agent available on the device; the bundle's path there."""
        raise NotImplementedError

    def run(self, runtime: str, bundle_path: str, agent_args: list, timeout_s: float, keep: bool) -> dict:
        """Run `python -m runtimes.<runtime> BUNDLE ARGS...` there; run_capped's outcome."""
        raise NotImplementedError

    def cleanup(self, keep: bool) -> None:
        """After a failed run: stop what it left and remove its temporary files (unless keep)."""

    def describe(self, facts: dict) -> dict:
        return {**facts, "name": self.name}


class LocalDevice(Device):
    """This machine. The bench agent runs in a fresh process, so its peak RSS is the artifact's."""

    kind = "local"

    def __init__(self, profile: Profile | None = None, memory_cap_mb: float = 0):
        self.profile = profile
        self.memory_cap_mb = profile.memory_cap_mb if profile else memory_cap_mb
        self.threads = profile.threads if profile else 0
        self.name = f"local (profile {profile.name})" if profile else "local"

    def probe(self, bundle_key, expected):
        return device_facts("."), list(expected)

    def stage(self, bundle_dir, bundle_key, expected, cached, runtime, log):
        return str(Path(bundle_dir).resolve())  # the agent runs from the repository root

    def run(self, runtime, bundle_path, agent_args, timeout_s, keep):
        command = [sys.executable, "-m", f"runtimes.{runtime}", bundle_path, *agent_args]
        return run_capped(command, str(REPO_ROOT), timeout_s, self.memory_cap_mb)

    def describe(self, facts):
        described = {**facts, "name": self.name, "kind": "profile" if self.profile else "local"}
        if self.profile:
            described["profile"] = {**asdict(self.profile),
                                    "note": "emulated on this machine: thread count and memory cap only; "
                                            "the CPU speed is this machine's"}
        return described
