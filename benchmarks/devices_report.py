"""One bundle benchmarked on this machine's desktop runtime, on an ssh device and under a device profile,
then `edgec report` over the three results: the figures in the README's "Devices and reports" section.

The three alternate, one repeat each, for --rounds rounds (this machine is shared, and load comes and goes);
each one's rounds are then pooled into one result (compiler.bench_report.merge_runs) for the report.

The ssh device is this machine's own OpenSSH sshd on a loopback port (started here as the tests start it,
with generated keys), its Python standing in for a Raspberry Pi's. Every step is the `edgec` command a user
would type; the script prints each one.

    .venv/bin/python benchmarks/devices_report.py BUNDLE [--out DIR] [--depths 0,512,1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler.bench_report import merge_runs
from tests.sshd import sshd_unavailable, start_sshd, stop_sshd

EDGEC = [str(Path(sys.executable).parent / "edgec")]


def edgec(*args, out: Path | None = None) -> None:
    command = [*EDGEC, *map(str, args)]
    print("$ " + shlex.join(["edgec", *command[1:]]) + (f" > {out}" if out else ""), flush=True)
    proc = subprocess.run(command, stdout=subprocess.PIPE if out else None, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    if out:
        out.write_text(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    sshd = start_sshd(args.out / "sshd")
    devices = {
        "desktop": [],
        "ssh-loopback": ["--device", sshd.url, "--identity", sshd.identity, "--known-hosts", sshd.known_hosts,
                         "--remote-python", sys.executable, "--remote-dir", args.out / "device"],
        "profile-rpi4": ["--profile", "rpi4"],
    }
    rounds: dict = {name: [] for name in devices}
    try:
        for round_ in range(args.rounds):
            for name, options in devices.items():
                out = args.out / f"{name}.round{round_}.json"
                edgec("bench", args.bundle, *options, *spec, out=out)
                rounds[name].append(json.loads(out.read_text()))
    finally:
        stop_sshd(sshd)
    for name, results in rounds.items():
        (args.out / f"{name}.json").write_text(json.dumps(merge_runs(results), indent=2))
    print(f"(each result: {args.rounds} alternating rounds pooled)")
    edgec("report", *(args.out / f"{name}.json" for name in devices), "--chart", args.out / "decode-vs-depth.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
