"""This machine as a device, optionally emulating a constrained one (a profile's threads and memory cap)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from devices.base import Device, Profile
from runtimes.agent import run_capped
from runtimes.base import device_facts

REPO_ROOT = Path(__file__).resolve().parent.parent


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
        return run_capped(command, str(REPO_ROOT), timeout_s, self.memory_cap_mb, huge_pages=self.huge_pages)

    def describe(self, facts):
        described = {**facts, "name": self.name, "kind": "profile" if self.profile else "local"}
        if self.profile:
            described["profile"] = {**asdict(self.profile),
                                    "note": "emulated on this machine: thread count and memory cap only; "
                                            "the CPU speed is this machine's"}
        return described
