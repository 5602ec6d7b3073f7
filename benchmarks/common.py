"""What the benchmarks share: running edgec and other tools as child processes, timing them, alternating
artifacts between rounds, markdown tables, and the SmolLM2-135M-shaped weights with a rank-16 adapter."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from runtimes.agent import with_huge_page_malloc

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # this environment's scripts: python, pip, edgec
EDGEC = BIN / "edgec"
CACHE = Path.home() / ".cache" / "edgec"
SMOLLM2_WORK = CACHE / "bench-smollm2"  # the SmolLM2-shaped benchmarks' default --work
ONE_B_WORK = CACHE / "bench-1b"  # the Llama-3.2-1B-shaped benchmarks' default --work
QWEN3_1_7B_WORK = CACHE / "bench-qwen3-1.7b"
PROMPT_TOKENS = 128  # the comparisons' workload: prefill of a 128-token prompt, then 128 new tokens
NEW_TOKENS = 128
CHILD_LOG = Path("/tmp/edgec-bench-child.log")


def argument_parser(doc: str, module: str) -> argparse.ArgumentParser:
    """A script's parser: described by its docstring's first paragraph, its usage as `python -m MODULE`."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])


# Set by rerun_on_huge_pages: GLIBC_TUNABLES as the user started the benchmark ("-" where it was unset).
TUNABLES_BEFORE_RERUN = "EDGEC_BENCH_TUNABLES_BEFORE_RERUN"


def rerun_on_huge_pages() -> None:
    """Start this benchmark again with glibc's huge-page malloc, as `edgec bench` starts its agents, unless
    its environment already says (glibc reads its tunables only at start). For benchmarks that time runtimes
    in their own process; those that time child processes give each child the environment instead. The
    children run() and timed() start (exports, merges) get the user's environment back."""
    env = with_huge_page_malloc(os.environ)
    if env != dict(os.environ) and TUNABLES_BEFORE_RERUN not in os.environ:  # once: never a loop of execs
        env[TUNABLES_BEFORE_RERUN] = os.environ.get("GLIBC_TUNABLES", "-")
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def child_environment() -> dict:
    """This process's environment for a timed child (HF_HUB_OFFLINE=1), as it was before rerun_on_huge_pages."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    before = env.pop(TUNABLES_BEFORE_RERUN, None)
    if before == "-":
        env.pop("GLIBC_TUNABLES", None)
    elif before is not None:
        env["GLIBC_TUNABLES"] = before
    return env


def run(command: Sequence, *, echo: bool = False, out: Path | None = None, ok: Sequence[int] = (0,)) -> str:
    """Run a child process (HF_HUB_OFFLINE=1) and return its stdout, written to `out` too when given.

    echo: print the command first, as one would type it, and let its output through (stdout too unless
    `out` takes it); on failure, exit with its exit status. Otherwise, on failure, exit with the command
    and the tail of its output. ok: the exit statuses that are not failures (edgec's 1 is a failed gate)."""
    command = [str(part) for part in command]
    if echo:
        print("$ " + shlex.join([Path(command[0]).name, *command[1:]]) + (f" > {out}" if out else ""), flush=True)
    proc = subprocess.run(command, stdout=subprocess.PIPE if out or not echo else None,
                          stderr=None if echo else subprocess.PIPE, text=True,
                          env=child_environment(), check=False)
    if proc.returncode not in ok and echo:
        sys.exit(proc.returncode)
    if proc.returncode not in ok:
        sys.exit(f"failed: {' '.join(command)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    if out:
        out.write_text(proc.stdout)
    return proc.stdout or ""


def edgec(*args, echo: bool = False, out: Path | None = None, ok: Sequence[int] = (0,)) -> str:
    """`edgec ARGS...` through run(): its stdout."""
    return run([EDGEC, *args], echo=echo, out=out, ok=ok)


def timed(command: Sequence, cwd: Path | None = None) -> tuple[float, float]:
    """Wall seconds and this child's own peak RSS (MB), from wait4; exits on failure. Output goes to CHILD_LOG."""
    command = [str(part) for part in command]
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        log = os.open(CHILD_LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        if cwd is not None:
            os.chdir(cwd)
        os.execve(command[0], command, child_environment())
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(command)}\n" + CHILD_LOG.read_text()[-3000:])
    return wall, usage.ru_maxrss / 1024


def rotations(names: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """The order of `names` in each of rounds + 1 rounds, each starting one further along, so that a slow
    spell of a shared machine lands on every artifact; the first round is a warm-up."""
    names = list(names)
    for round_index in range(rounds + 1):
        yield names[round_index % len(names):] + names[: round_index % len(names)]


def print_table(header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


def print_artifacts(artifacts: dict[str, dict]) -> None:
    """The comparisons' table: speed (medians, decode's spread), size and export cost per artifact."""
    run_rss = all("rss_mb" in a for a in artifacts.values())  # scripts whose runs are their own processes
    rows = []
    for name, a in artifacts.items():
        lo, hi = a["decode_spread"]
        rows.append([name, f"{a['prefill_ms']:.1f}", f"{a['decode_tps']:.1f} [{lo:.1f}-{hi:.1f}]",
                     *([f"{a['rss_mb']:.0f}"] if run_rss else []),
                     f"{a['size_mb']:.1f}", f"{a['export_s']:.1f}", f"{a['export_rss_mb']:.0f}"])
    print_table(["artifact", f"prefill {PROMPT_TOKENS} tok (ms)", "decode (tok/s) [min-max]",
                 *(["run peak RSS (MB)"] if run_rss else []), "size (MB)", "export (s)", "export peak RSS (MB)"], rows)


RATIOS = {"decode_tps": "decode tokens/s", "prefill_ms": "prefill time", "size_mb": "size",
          "export_s": "export wall time", "export_rss_mb": "export peak RSS", "rss_mb": "run peak RSS"}


def print_ratios(ours: dict, ref: dict, targets: dict[str, str | None]) -> None:
    """One line per figure in `targets` (keys of RATIOS): ours / ref, and the target when there is one."""
    for key, target in targets.items():
        print(f"  {RATIOS[key]:<18}{ours[key] / ref[key]:.2f}x" + (f"  (target {target})" if target else ""))


def smollm2_shaped(work: Path) -> Path:
    """The SmolLM2-135M shape with random weights, made once in `work`/model."""
    from compiler.tiny_models import SMOLLM2_135M

    return _shaped(work / "model", "SmolLM2-135M", SMOLLM2_135M)


def llama1b_shaped(work: Path) -> Path:
    """The Llama-3.2-1B shape with random weights (fp32, about 5 GB), made once in `work`/model."""
    from compiler.tiny_models import LLAMA32_1B

    return _shaped(work / "model", "Llama-3.2-1B", LLAMA32_1B)


def qwen3_1_7b_shaped(work: Path) -> Path:
    """The Qwen3-1.7B shape with random weights (fp32, about 6.9 GB), made once in `work`/model."""
    from compiler.tiny_models import QWEN3_1_7B

    return _shaped(work / "model", "Qwen3-1.7B", QWEN3_1_7B, "qwen3")


def _shaped(model: Path, name: str, shape: dict, family: str = "llama") -> Path:
    from compiler.tiny_models import make_model

    if not (model / "config.json").exists():
        print(f"making the {name}-shaped model ...", flush=True)
        make_model(model, family, **shape)
    return model


def smollm2_with_adapter(work: Path) -> tuple[Path, Path]:
    """The benchmarks' weights, made once in `work`: the SmolLM2-135M shape and a rank-16 adapter."""
    from compiler.tiny_models import ALL_PROJECTIONS, make_adapter

    model, adapter = smollm2_shaped(work), work / "lora-r16"
    if not (adapter / "adapter_config.json").exists():
        print("making the rank-16 adapter on all seven projections ...", flush=True)
        make_adapter(model, adapter, target_modules=ALL_PROJECTIONS, r=16, alpha=32)
    return model, adapter


def merge_with_peft(model: Path, adapter: Path):
    """transformers + PEFT's `merge_and_unload`, in fp32: the reference way to merge an adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def save_merged_with_peft(model: Path, adapter: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    merge_with_peft(model, adapter).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(model)).save_pretrained(str(out))


def timed_peft_merge(model: Path, adapter: Path, out: Path) -> tuple[float, float]:
    """save_merged_with_peft into a fresh `out`, in its own process: timed()'s (wall seconds, peak RSS MB)."""
    shutil.rmtree(out, ignore_errors=True)
    child = ("import sys; from pathlib import Path; from benchmarks.common import save_merged_with_peft; "
             "save_merged_with_peft(*map(Path, sys.argv[1:]))")
    return timed([BIN / "python", "-c", child, model.resolve(), adapter.resolve(), out.resolve()], cwd=ROOT)
