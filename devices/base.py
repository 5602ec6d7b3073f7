"""What every device is: the Device interface the bench steps drive, and the profiles a device can be
emulated by on this machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    """What bench needs from a device; see devices.local.LocalDevice and devices.ssh.SshDevice."""

    name = "device"
    memory_cap_mb: float = 0  # 0: none beyond the device's free memory
    huge_pages: bool = True  # the agent's malloc on transparent huge pages (runtimes.agent.HUGE_PAGE_MALLOC)
    threads: int = 0  # 0: the bench spec decides
    disk_hint = "free space or pass --remote-dir on a larger disk"  # what to do when the bundle would not fit

    def probe(self, bundle_key: str, expected: dict) -> tuple[dict, list]:
        """(device facts, names of the expected bundle files the device already holds)."""
        raise NotImplementedError

    def stage(self, bundle_dir: Path, bundle_key: str, expected: dict, cached: list, runtime: str, log) -> str:
        """Make the bundle and the runtime's agent available on the device; the bundle's path there."""
        raise NotImplementedError

    def run(self, runtime: str, bundle_path: str, agent_args: list, timeout_s: float, keep: bool) -> dict:
        """Run `python -m runtimes.<runtime> BUNDLE ARGS...` there; runtimes.agent.run_capped's outcome."""
        raise NotImplementedError

    def cleanup(self, keep: bool) -> None:
        """After a failed run: stop what it left and remove its temporary files (unless keep)."""

    def describe(self, facts: dict) -> dict:
        return {**facts, "name": self.name}
