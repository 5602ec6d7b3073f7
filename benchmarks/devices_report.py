"""One bundle benchmarked on this machine's desktop runtime, on an ssh device (a loopback sshd) and under a device
profile, alternating, then `edgec report` over the three: the figures in docs/devices.md.

    python -m benchmarks.devices_report BUNDLE [--out DIR] [--depths 0,512,1024] [--rounds 3]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import argument_parser, edgec
from devices.report import merge_runs
from tests.sshd import sshd_unavailable, start_sshd, stop_sshd


def main() -> int:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=Path("devices-report"))
    parser.add_argument("--depths", default="0,512,1024")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    reason = sshd_unavailable()
    if reason:
        sys.exit(f"devices_report: {reason}")
    args.out.mkdir(parents=True, exist_ok=True)
    spec = ["--depths", args.depths, "--repeats", "1", "--prompt-tokens", "128", "--new-tokens", "128", "--quiet",
            "--json"]
    # This machine's own OpenSSH sshd on a loopback port, started as the tests start it (generated keys), its
    # Python standing in for a Raspberry Pi's. Every step is the `edgec` command a user would type, printed.
    sshd = start_sshd(args.out / "sshd")
    devices = {
        "desktop": [],
        "ssh-loopback": ["--device", sshd.url, "--identity", sshd.identity, "--known-hosts", sshd.known_hosts,
                         "--remote-python", sys.executable, "--remote-dir", args.out / "device"],
        "profile-rpi4": ["--profile", "rpi4"],
    }
    rounds: dict = {name: [] for name in devices}
    try:  # one repeat each per round, alternating, as this machine is shared and load comes and goes
        for round_ in range(args.rounds):
            for name, options in devices.items():
                out = args.out / f"{name}.round{round_}.json"
                edgec("bench", args.bundle, *options, *spec, echo=True, out=out)
                rounds[name].append(json.loads(out.read_text()))
    finally:
        stop_sshd(sshd)
    for name, results in rounds.items():  # each one's rounds pooled into one result
        (args.out / f"{name}.json").write_text(json.dumps(merge_runs(results), indent=2))
    print(f"(each result: {args.rounds} alternating rounds pooled)")
    edgec("report", *(args.out / f"{name}.json" for name in devices), "--chart", args.out / "decode-vs-depth.png",
          echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
