"""Progress bars: `edgec build` draws them when stderr is a terminal (a real pseudo-terminal here), and
neither with --quiet nor into a pipe, where the plain stage lines stay as they were."""

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BAR = "%|"  # tqdm's percentage running into the bar


def edgec_stderr(args, terminal: bool, timeout_s: float = 120) -> tuple[int, str]:
    """(exit code, stderr) of `python -m compiler.cli ARGS`, stderr on a pseudo-terminal or on a pipe."""
    command = [sys.executable, "-m", "compiler.cli", *map(str, args)]
    if not terminal:
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=timeout_s)
        return done.returncode, done.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1)[0]:
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), b"".join(chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


# A build stopped by a usage error once the load and merge stages (each with a bar) are done: a few seconds,
# where a whole build of the tiny model takes fifteen.
EARLY_EXIT = ["--format", "pte", "--max-seq-len", "1000000", "--no-validate"]


def build_stderr(llama_dir, llama_adapter, out, terminal: bool, *extra) -> str:
    code, stderr = edgec_stderr(["build", "--model", llama_dir, "--adapter", llama_adapter, "--out", out,
                                 *EARLY_EXIT, *extra], terminal)
    assert code == 2 and "supports at most" in stderr, stderr
    return stderr


def test_build_on_a_terminal_draws_bars_and_keeps_the_stage_lines(llama_dir, llama_adapter, tmp_path):
    stderr = build_stderr(llama_dir, llama_adapter, tmp_path / "b", True)
    assert "weights:" in stderr and "modules:" in stderr and BAR in stderr, stderr
    assert "load done in" in stderr and "merge_lora done in" in stderr, stderr


@pytest.mark.parametrize("terminal, quiet", [(True, True), (False, False)], ids=["quiet", "pipe"])
def test_no_bars_with_quiet_or_into_a_pipe(llama_dir, llama_adapter, tmp_path, terminal, quiet):
    stderr = build_stderr(llama_dir, llama_adapter, tmp_path / "b", terminal, *(["--quiet"] if quiet else []))
    assert BAR not in stderr and "weights:" not in stderr, stderr
    if not terminal:  # a terminal turns each newline into \r\n; a pipe gets no redraws at all
        assert "\r" not in stderr, stderr
    assert ("load done in" in stderr) is not quiet, stderr
