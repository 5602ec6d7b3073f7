"""One bundle benchmarked on this machine's desktop runtime, on an ssh device and under a device profile,
then `edgec report` over the three results: the figures in the README's "Devices and reports" section.

The ssh device is this machine's own OpenSSH sshd on a loopback port (started here as the tests start it,
with generated keys), its Python standing in for a Raspberry Pi's. Every step is the `edgec` command a user
would type; the script prints each one.

    .venv/bin/python benchmarks/devices_report.py BUNDLE [--out DIR] [--depths 0,512,1024]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.sshd import sshd_unavailable, start_sshd, stop_sshd  # noqa: E402

EDGEC = [str(Path(sys.executable).parent / "edgec")]


def edgec(*args, out: Path | None = None) -> None:
    command = [*EDGEC, *map(str, args)]
    print("$ " + shlex.join(["edgec", *command[1:]]) + (f" > {out}" if out else ""), flush=True)
    proc = subprocess.run(command, stdout=subprocess.PIPE if out else None, text=True)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    if out:
        out.write_text(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=Path("devices-report"))
    parser.add_argument("--depths", default="0,512,1024")
    parser.add_argument("--repeats", default="3")
    args = parser.parse_args()
    reason = sshd_unavailable()
    if reason:
        sys.exit(f"devices_report: {reason}")
    args.out.mkdir(parents=True, exist_ok=True)
    spec = ["--depths", args.depths, "--repeats", args.repeats, "--prompt-tokens", "128", "--new-tokens", "128",
            "--quiet"]
    sshd = start_sshd(args.out / "sshd")
    try:
        edgec("bench", args.bundle, *spec, "--json", out=args.out / "desktop.json")
        edgec("bench", args.bundle, "--device", sshd.url, "--identity", sshd.identity, "--known-hosts",
              sshd.known_hosts, "--remote-python", sys.executable, "--remote-dir", args.out / "device", *spec,
              "--json", out=args.out / "ssh-loopback.json")
        edgec("bench", args.bundle, "--profile", "rpi4", *spec, "--json", out=args.out / "profile-rpi4.json")
    finally:
        stop_sshd(sshd)
    edgec("report", args.out / "desktop.json", args.out / "ssh-loopback.json", args.out / "profile-rpi4.json",
          "--chart", args.out / "decode-vs-depth.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
