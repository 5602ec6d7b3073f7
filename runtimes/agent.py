"""The device side of a benchmark: probe the device, check the bundle cache, run a runtime's bench agent
under a time limit and a memory cap, clean up.

Standard library only (Python 3.8+). On an ssh device it runs from a per-run directory as
`python3 -m runtimes.agent run ...` (base.py and the runtime's agent beside it), or, before anything is
pushed, from the ssh command's stdin (`probe`, `cleanup`). On the local device edgec calls `run_capped`
in-process.

Protocol: every command prints one JSON object on stdout; progress and diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from runtimes.base import device_facts, proc_file_mb, sha256_file

HASHES = ".edgec-hashes.json"  # in a cached bundle: name -> [bytes, mtime_ns, sha256], so reruns skip hashing
POLL_S = 0.02


def _load_hashes(bundle_dir: str) -> dict:
    try:
        with open(os.path.join(bundle_dir, HASHES)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def cached_files(bundle_dir: str, expected: dict) -> list:
    """Names in `expected` (name -> [bytes, sha256]) already in bundle_dir with that sha256.

    A file whose size and mtime match the record left by the last push is trusted without rehashing."""
    known = _load_hashes(bundle_dir)
    have = []
    for name, (size, sha) in expected.items():
        path = os.path.join(bundle_dir, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_size != size:
            continue
        record = known.get(name)
        if record and record[:2] == [st.st_size, st.st_mtime_ns]:
            digest = record[2]
        else:
            digest = sha256_file(path)
        if digest == sha:
            have.append(name)
    return have


def record_hashes(bundle_dir: str, expected: dict) -> list:
    """Hash every expected (just pushed) file in bundle_dir, add the matching ones to the records; return
    the names that mismatch."""
    if not expected:
        return []
    known = _load_hashes(bundle_dir)
    bad = []
    for name, (size, sha) in expected.items():
        path = os.path.join(bundle_dir, name)
        try:
            st = os.stat(path)
            digest = sha256_file(path)
        except OSError:
            bad.append(name)
            continue
        if digest == sha and st.st_size == size:
            known[name] = [st.st_size, st.st_mtime_ns, digest]
        else:
            known.pop(name, None)
            bad.append(name)
    tmp = os.path.join(bundle_dir, HASHES + ".tmp")
    with open(tmp, "w") as f:
        json.dump(known, f)
    os.replace(tmp, os.path.join(bundle_dir, HASHES))
    return bad


def rss_mb(pid: int):
    """Resident set size of a process now (VmRSS), or None where /proc is missing or the process is gone."""
    return proc_file_mb(f"/proc/{pid}/status", "VmRSS")


# glibc's malloc then asks for transparent huge pages on the memory it maps (glibc 2.35 and later; other C
# libraries and older glibc ignore it). A decode step reads every packed weight once, and with 4 KiB pages
# nearly every page read is a TLB miss: the 1B shape decoded 11-18% faster on 2 MiB pages, in both formats,
# but its .pte loaded in 3.5-4.1 s instead of 2.0 (docs/measurements.md). A sparsely touched block can hold
# more resident memory on huge pages (peak RSS of real bundles moved under 1%). A GLIBC_TUNABLES that already
# sets it is kept; `--no-huge-pages` leaves the environment alone.
HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"


def with_huge_page_malloc(environ) -> dict:
    """A copy of `environ` in which glibc's malloc backs its mapped memory with transparent huge pages."""
    env = dict(environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" not in tunables:
        env["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGE_MALLOC}" if tunables else HUGE_PAGE_MALLOC
    return env


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_capped(command: list, cwd: str, timeout_s: float = 0, memory_cap_mb: float = 0,
               watch_stdin: bool = False, on_start=None, huge_pages: bool = True) -> dict:
    """Run `command` in its own process group; kill the whole group when it runs past timeout_s, when its
    resident memory passes memory_cap_mb, or (watch_stdin) when our stdin closes: the ssh connection that
    started us is gone, and nobody is left to read the result.

    The memory cap is a watchdog on VmRSS (every 20 ms) rather than RLIMIT_AS: onnxruntime and glibc reserve
    several times the resident size in address space (thread stacks, malloc arenas), so an address-space
    limit refuses runs that would fit, and onnxruntime hung, not failed, when a thread could not start
    under one. The caller also checks the agent's own peak (VmHWM) against the cap, for spikes between polls.
    huge_pages: start the command with glibc's huge-page malloc (HUGE_PAGE_MALLOC).
    """
    proc = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env=with_huge_page_malloc(os.environ) if huge_pages else None)
    if on_start is not None:
        on_start(proc.pid)
    out, err = [], []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    disconnected = threading.Event()
    if watch_stdin:
        def wait_for_eof():  # os.read, not sys.stdin: a buffered reader's lock aborts the exit of Python
            try:
                while os.read(0, 65536):
                    pass
            except OSError:
                pass
            disconnected.set()
        threading.Thread(target=wait_for_eof, daemon=True).start()

    started = time.monotonic()
    peak = 0.0
    status = None
    try:
        while proc.poll() is None:
            rss = rss_mb(proc.pid)
            peak = max(peak, rss or 0.0)
            if memory_cap_mb and rss is not None and rss > memory_cap_mb:
                status = "memory"
            elif timeout_s and time.monotonic() - started > timeout_s:
                status = "timeout"
            elif disconnected.is_set():
                status = "disconnected"
            if status:
                break
            time.sleep(POLL_S)
    finally:
        _kill_group(proc.pid)  # also whatever the agent left behind when it ended by itself
        proc.wait()
    for reader in readers:
        reader.join(5)
    code = proc.returncode
    if status is None:
        status = "ok" if code == 0 else ("killed" if code < 0 else "failed")
    return {
        "status": status,
        "returncode": code,
        "signal": -code if code < 0 and status == "killed" else None,
        "seconds": time.monotonic() - started,
        "observed_peak_rss_mb": peak,
        "stdout": b"".join(out).decode("utf-8", "replace"),
        "stderr": b"".join(err).decode("utf-8", "replace")[-4000:],
    }


def processes_under(directory: str) -> list:
    """PIDs (other than ours) whose working directory is `directory` or below it, or whose command line
    names it: what a run left behind."""
    directory = os.path.realpath(directory)
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) in (os.getpid(), os.getppid()):
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            if cwd.endswith(" (deleted)"):  # the run directory was removed under a live process
                cwd = cwd[: -len(" (deleted)")]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        if cwd == directory or cwd.startswith(directory + os.sep) or directory in cmdline:
            found.append(int(entry))
    return found


def cleanup(run_dir: str, keep: bool = False) -> dict:
    """Kill what a run left (its process group went with the launcher, but the launcher itself may be
    stuck or gone), then remove the run directory unless keep."""
    killed = []
    for pid in processes_under(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    removed = False
    if not keep and os.path.isdir(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        removed = True
    return {"killed": killed, "removed": removed}


def _run(args) -> dict:
    """Run the runtime's agent (`python -m runtimes.<runtime> BUNDLE ...`) from the run directory."""
    run_dir = os.path.abspath(args.run_dir)

    def stop(signum, frame):  # the ssh session or someone ended us: the finally below still runs
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        command = [sys.executable, "-m", f"runtimes.{args.runtime}", *args.agent_args]

        def started(pid):
            print(f"edgec-agent: started pid {pid} in {run_dir}", file=sys.stderr, flush=True)

        result = run_capped(command, run_dir, args.timeout, args.memory_cap_mb, args.watch_stdin, started,
                            huge_pages=not args.no_huge_pages)
        with open(os.path.join(run_dir, "agent.log"), "w") as f:
            f.write(result["stderr"])
        return result
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="runtimes.agent", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="device facts, and which bundle files are already cached")
    probe.add_argument("--bundle-dir", required=True)
    probe.add_argument("--expect", default="{}", help="JSON: name -> [bytes, sha256]")
    verify = sub.add_parser("verify", help="check pushed files against their sha256 and remember them")
    verify.add_argument("--bundle-dir", required=True)
    verify.add_argument("--expect", required=True, help="a JSON file: name -> [bytes, sha256]")
    run = sub.add_parser("run", help="run a runtime's bench agent under a time limit and a memory cap")
    run.add_argument("--run-dir", required=True)
    run.add_argument("--runtime", required=True, help="the agent module in runtimes/, e.g. ort")
    run.add_argument("--timeout", type=float, default=0)
    run.add_argument("--memory-cap-mb", type=float, default=0)
    run.add_argument("--watch-stdin", action="store_true")
    run.add_argument("--no-huge-pages", action="store_true", help="leave glibc's malloc tunables as they are")
    run.add_argument("--keep", action="store_true")
    run.add_argument("agent_args", nargs=argparse.REMAINDER)
    clean = sub.add_parser("cleanup", help="kill what a run left and remove its directory")
    clean.add_argument("--run-dir", required=True)
    clean.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "probe":
        expected = json.loads(args.expect)
        result = {"facts": device_facts(args.bundle_dir), "cached": cached_files(args.bundle_dir, expected)}
    elif args.command == "verify":
        with open(args.expect) as f:
            result = {"mismatched": record_hashes(args.bundle_dir, json.load(f))}
    elif args.command == "run":
        if args.agent_args[:1] == ["--"]:
            args.agent_args = args.agent_args[1:]
        result = _run(args)
    else:
        result = cleanup(args.run_dir, args.keep)
    try:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the connection is gone; the run already cleaned up after itself
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
