"""edgec bench on devices: the local machine, constrained local profiles, and ssh against a real OpenSSH sshd
on loopback (this machine's Python as the device's). Each fault of the remote path is provoked for real."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.cli import main
from runtimes.agent import HUGE_PAGE_MALLOC, processes_under, run_capped, with_huge_page_malloc
from runtimes.base import transparent_huge_pages
from tests.sshd import free_port, sshd_unavailable, start_sshd, stop_sshd

FAST = ["--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--warmup", "0"]
# A run long enough to interrupt: the tiny model decodes thousands of tokens/s.
LONG = ["--prompt-tokens", "8", "--new-tokens", "200", "--repeats", "100000", "--warmup", "0"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result_or_stderr, code=None):
    stderr = getattr(result_or_stderr, "stderr", result_or_stderr)
    if code is not None:
        assert result_or_stderr.exit_code == code, result_or_stderr.output
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    reason = sshd_unavailable()
    if reason:
        pytest.skip(reason)
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    stop_sshd(server)


@pytest.fixture
def device_dir(tmp_path):
    return tmp_path / "device"


def ssh_args(sshd, device_dir, *extra, identity=None, known_hosts=None):
    return ["--device", sshd.url, "--identity", identity or sshd.identity, "--known-hosts",
            known_hosts or sshd.known_hosts, "--remote-python", sys.executable, "--remote-dir", device_dir, *extra]


def leftovers(device_dir, wait_s=10.0):
    """Processes still running under the device's edgec directory, after giving cleanup a moment."""
    deadline = time.monotonic() + wait_s
    while True:
        found = processes_under(str(device_dir)) if device_dir.exists() else []
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def run_dirs(device_dir):
    runs = device_dir / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.exists() else []


def test_ssh_bench_end_to_end_pushes_once_and_cleans_up(sshd, tiny_bundle, device_dir):
    first = run("bench", tiny_bundle, *ssh_args(sshd, device_dir, "--depths", "0,16"), *FAST, "--json")
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    assert result["schema"] == "edgec.bench/1" and result["runtime"]["name"] == "onnxruntime"
    device = result["device"]
    assert device["name"] == sshd.url and device["kind"] == "ssh"
    assert device["runtimes"]["onnxruntime"] and device["mem_available_mb"] > 0 and device["disk_free_mb"] > 0
    assert [e["depth"] for e in result["by_depth"]] == [0, 16]
    assert all(e["decode_tokens_per_s"] > 0 for e in result["by_depth"])
    if transparent_huge_pages() == "madvise":  # the device's agent ran on huge pages: only asked-for ones here
        assert result["huge_pages_mb"] > 0
    manifest_sha = result["bundle"]["manifest_sha256"]
    cached = device_dir / "bundles" / manifest_sha[:16]
    assert (cached / "model.onnx.data").read_bytes() == (tiny_bundle / "model.onnx.data").read_bytes()
    files = len(list(tiny_bundle.iterdir()))
    assert f"pushing {files} bundle files" in first.stderr and "0 already there" in first.stderr
    assert run_dirs(device_dir) == [] and leftovers(device_dir) == []
    mtimes = {p.name: p.stat().st_mtime_ns for p in cached.iterdir()}

    second = run("bench", tiny_bundle, *ssh_args(sshd, device_dir, "--keep", "--no-huge-pages"), *FAST, "--json")
    assert second.exit_code == 0, second.output
    if transparent_huge_pages() == "madvise":  # in "always" mode the kernel gives them anyway
        assert json.loads(second.stdout)["huge_pages_mb"] == 0
    assert "pushing 0 bundle files" in second.stderr and f"{files} already there" in second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in cached.iterdir()} == mtimes  # nothing rewritten
    kept = run_dirs(device_dir)
    assert len(kept) == 1 and (device_dir / "runs" / kept[0] / "runtimes" / "ort.py").exists()
    assert (device_dir / "runs" / kept[0] / "agent.log").exists()


def test_ssh_connection_refused(tiny_bundle, tmp_path):
    result = run("bench", tiny_bundle, "--device", f"ssh://nobody@127.0.0.1:{free_port()}", "--quiet", *FAST)
    assert "connection refused" in one_line_error(result, 1)


def test_ssh_auth_failure(sshd, tiny_bundle, device_dir):
    result = run("bench", tiny_bundle, *ssh_args(sshd, device_dir, identity=sshd.stranger), "--quiet", *FAST)
    line = one_line_error(result, 1)
    assert "authentication failed" in line and "--identity" in line
    assert not device_dir.exists()


def test_ssh_unknown_host_key_is_refused_unless_accepted(sshd, tiny_bundle, device_dir, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    refused = run("bench", tiny_bundle, *ssh_args(sshd, device_dir, known_hosts=empty), "--quiet", *FAST)
    assert "host key is not in known_hosts" in one_line_error(refused, 1)
    assert not device_dir.exists() and empty.read_text() == ""
    # First contact trusted on request: the key is recorded; the preflight then runs (and refuses a
    # Python without onnxruntime, before pushing anything).
    accepted = run("bench", tiny_bundle, *ssh_args(sshd, device_dir, "--accept-new-host-key", known_hosts=empty),
                   "--remote-python", "/no/such/python3", "--quiet", *FAST)
    assert "ssh-ed25519" in empty.read_text()  # (Debian's ssh hashes the host name)
    assert "/no/such/python3" in one_line_error(accepted, 1)


@pytest.mark.skipif(subprocess.run(["/usr/bin/python3", "-c", "import onnxruntime"], capture_output=True,
                                   check=False).returncode
                    != 1, reason="needs a /usr/bin/python3 without onnxruntime")
def test_preflight_refuses_a_device_without_the_runtime(sshd, tiny_bundle, device_dir):
    result = run("bench", tiny_bundle, *ssh_args(sshd, device_dir), "--remote-python", "/usr/bin/python3", "--quiet",
                 *FAST)
    line = one_line_error(result, 1)
    assert "onnxruntime" in line and "not installed" in line and "/usr/bin/python3 -m pip install onnxruntime" in line
    assert not (device_dir / "bundles").exists()


def test_preflight_refuses_an_oversized_bundle_before_pushing(sshd, tiny_bundle, device_dir):
    result = run("bench", tiny_bundle, *ssh_args(sshd, device_dir, "--memory-cap", "40MB"), "--quiet", *FAST)
    line = one_line_error(result, 1)
    assert "does not fit" in line and "memory cap is 40 MB" in line and "KV cache" in line
    assert not device_dir.exists()  # nothing pushed, no directory made


def test_ssh_run_past_timeout_is_stopped_and_cleaned_up(sshd, tiny_bundle, device_dir):
    started = time.monotonic()
    result = run("bench", tiny_bundle, *ssh_args(sshd, device_dir, "--timeout", "2"), "--quiet", *LONG)
    assert "ran past --timeout 2 s" in one_line_error(result, 1)
    assert time.monotonic() - started < 20
    assert leftovers(device_dir) == [] and run_dirs(device_dir) == []
    assert (device_dir / "bundles").exists()  # the cache stays for the next run


def start_long_run(sshd, bundle, device_dir):
    command = [sys.executable, "-m", "compiler.cli", "bench", str(bundle),
               *map(str, ssh_args(sshd, device_dir, "--timeout", "120")), "--quiet", *LONG]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the agent runs on the "device"
        agents = [pid for pid in processes_under(str(device_dir)) if b"runtimes.ort" in
                  Path(f"/proc/{pid}/cmdline").read_bytes()] if device_dir.exists() else []
        if agents:
            time.sleep(0.5)  # well into the run
            return proc, agents[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the bench agent did not start on the device")


def test_ssh_remote_process_killed(sshd, tiny_bundle, device_dir):
    proc, agent = start_long_run(sshd, tiny_bundle, device_dir)
    os.kill(agent, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "killed by SIGKILL" in one_line_error(stderr)
    assert leftovers(device_dir) == [] and run_dirs(device_dir) == []


def test_ssh_connection_dropped_mid_run(sshd, tiny_bundle, device_dir):
    proc, _ = start_long_run(sshd, tiny_bundle, device_dir)
    for pid in sshd.session_pids():  # the server side of the connection goes away, as when a link drops
        os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "connection dropped during the run" in one_line_error(stderr)
    assert leftovers(device_dir) == [] and run_dirs(device_dir) == []


def test_local_profile_sets_threads_and_is_labelled(tiny_bundle):
    result = run("bench", tiny_bundle, "--profile", "rpi4", "--json", "--quiet", *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["runtime"]["threads"] == 4
    assert data["device"]["kind"] == "profile" and data["device"]["name"] == "local (profile rpi4)"
    assert data["device"]["profile"]["memory_cap_mb"] == 1600 and "emulated" in data["device"]["profile"]["note"]


def test_memory_cap_stops_a_run_that_does_not_fit(tiny_bundle):
    """The cap is a watchdog on resident memory: the real agent (about 65 MB resident) under a 40 MB cap is
    stopped with its process group; without a cap the same command succeeds."""
    command = [sys.executable, "-m", "runtimes.ort", str(tiny_bundle), *FAST]
    capped = run_capped(command, os.getcwd(), timeout_s=60, memory_cap_mb=40)
    assert capped["status"] == "memory" and capped["observed_peak_rss_mb"] > 40
    free = run_capped(command, os.getcwd(), timeout_s=60)
    assert free["status"] == "ok" and json.loads(free["stdout"])["peak_rss_mb"] > 40


# A 64 MiB block from glibc's malloc (its own mapping), written, and how much of this process is on huge pages.
WRITES_A_MAPPED_BLOCK = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
print(next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")))
"""


@pytest.mark.skipif(transparent_huge_pages() not in ("madvise", "always"), reason="no transparent huge pages")
def test_a_runs_malloc_asks_for_huge_pages_unless_the_user_said_otherwise(monkeypatch):
    """glibc (2.35 and later) madvises the blocks it maps when run_capped's child has the tunable: with the
    kernel's THP in madvise mode, only that puts the block on huge pages."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    command = [sys.executable, "-c", WRITES_A_MAPPED_BLOCK]
    run = run_capped(command, os.getcwd(), timeout_s=60)
    assert run["status"] == "ok" and int(run["stdout"]) >= 32 << 10, run  # KiB: at least half the block
    if transparent_huge_pages() == "madvise":
        monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
        opted_out = run_capped(command, os.getcwd(), timeout_s=60)
        assert opted_out["status"] == "ok" and int(opted_out["stdout"]) == 0, opted_out


@pytest.mark.parametrize("before, after", [
    (None, HUGE_PAGE_MALLOC),
    ("", HUGE_PAGE_MALLOC),
    ("glibc.malloc.arena_max=2", f"glibc.malloc.arena_max=2:{HUGE_PAGE_MALLOC}"),
    ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),  # the user's own setting wins
])
def test_a_runs_environment_gets_the_huge_page_tunable_next_to_the_users(monkeypatch, before, after):
    if before is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", before)
    prints_it = [sys.executable, "-c", "import os; print(os.environ.get('GLIBC_TUNABLES', '<unset>'))"]
    assert run_capped(prints_it, os.getcwd(), timeout_s=60)["stdout"].strip() == after
    untouched = run_capped(prints_it, os.getcwd(), timeout_s=60, huge_pages=False)["stdout"].strip()
    assert untouched == ("<unset>" if before is None else before)


@pytest.mark.skipif(transparent_huge_pages() != "madvise", reason="THP not in madvise mode")
def test_bench_says_how_much_of_the_run_was_on_huge_pages_and_can_leave_them_off(tiny_bundle, monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    on = json.loads(run("bench", tiny_bundle, "--json", "--quiet", *FAST).stdout)
    off = run("bench", tiny_bundle, "--no-huge-pages", "--json", "--quiet", *FAST)
    assert off.exit_code == 0, off.output
    off = json.loads(off.stdout)
    assert on["huge_pages_mb"] > 0 and off["huge_pages_mb"] == 0
    assert on["device"]["huge_pages"] is True and off["device"]["huge_pages"] is False  # what was asked for


def test_context_before_the_prompt_gives_the_same_tokens(tiny_bundle):
    from runtimes.ort import OrtRuntime

    runner = OrtRuntime(tiny_bundle)
    context, prompt = list(range(3, 43)), [7, 99, 130, 4]
    for shared in (True, False):
        assert (runner.generate(prompt, 6, shared_buffer=shared, context=context)
                == runner.generate(context + prompt, 6, shared_buffer=shared))


@pytest.mark.parametrize("args, fragment", [
    (["--device", "ftp://pi@host"], "--device ftp://pi@host"),
    (["--device", "ssh://pi@host:99999"], "port"),
    (["--device", "ssh://pi@host", "--profile", "rpi4"], "--profile rpi4"),
    (["--profile", "rpi4", "--memory-cap", "1GB"], "--memory-cap 1GB"),
    (["--memory-cap", "lots"], "--memory-cap lots"),
    (["--depths", "0,x"], "--depths 0,x"),
    (["--depths", "0,10000"], "context is 256"),
    (["--device", "ssh://pi@host", "--identity", "/no/key"], "--identity /no/key"),
    (["--profile", "rpi4", "--threads", "2"], "--threads 2"),
])
def test_bad_bench_options(tiny_bundle, args, fragment):
    assert fragment in one_line_error(run("bench", tiny_bundle, *args), 2)


def test_agent_stops_its_run_when_its_connection_closes(tiny_bundle, tmp_path):
    """What keeps a dropped ssh connection from leaving a process on the device, without any help from the
    host: the agent takes end-of-file on its stdin as the connection's end, kills the run's process group
    and removes the run directory."""
    import shutil

    from devices.ssh import RUNTIMES_DIR
    from runtimes.registry import AGENT_MODULES

    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "runtimes").mkdir(parents=True)
    for module in (*AGENT_MODULES, "ort"):
        shutil.copy(RUNTIMES_DIR / f"{module}.py", run_dir / "runtimes")
    agent = subprocess.Popen([sys.executable, "-m", "runtimes.agent", "run", "--run-dir", ".", "--runtime", "ort",
                              "--watch-stdin", "--", str(tiny_bundle), *LONG], cwd=run_dir, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while len(processes_under(str(run_dir))) < 2:  # the agent and the runtime's bench under it
        assert time.monotonic() < deadline and agent.poll() is None
        time.sleep(0.05)
    agent.stdin.close()
    agent.wait(30)
    out = agent.stdout.read()
    assert json.loads(out)["status"] == "disconnected"
    assert leftovers(tmp_path, wait_s=2) == [] and not run_dir.exists()
