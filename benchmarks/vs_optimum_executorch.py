"""edgec's .pte against optimum-executorch's (both 8da4w), from the same weights, run in ExecuTorch's runtime.

Speed (alternating token by token), size and export cost, on the SmolLM2-135M-shaped Llama + rank-16 LoRA:

    python -m benchmarks.vs_optimum_executorch [--work DIR] [--rounds N] [--only-measure]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (CACHE, EDGEC, NEW_TOKENS, PROMPT_TOKENS, SMOLLM2_WORK, argument_parser, print_artifacts,
                               print_ratios, rerun_on_huge_pages, smollm2_with_adapter, timed, timed_peft_merge)
from compiler.tiny_models import SMOLLM2_135M
from runtimes.executorch import ExecutorchRuntime

# optimum-executorch pins transformers 5.0.0rc1, so it lives in its own virtual environment, made on first use.
OPTIMUM_VENV = CACHE / "optimum-executorch-venv"
OPTIMUM_PINS = ["torch==2.13.0", "executorch==1.5.1", "torchao==0.18.0", "optimum-executorch==1.1.0"]


def optimum_cli() -> Path:
    cli = OPTIMUM_VENV / "bin" / "optimum-cli"
    if not cli.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OPTIMUM_VENV)], check=True)
        subprocess.run([str(OPTIMUM_VENV / "bin" / "pip"), "install", "-q", *OPTIMUM_PINS], check=True)
    return cli


def builds(work: Path, model: Path, adapter: Path) -> dict[str, dict]:
    """edgec merges the adapter itself; optimum-executorch takes a Hugging Face model, so it gets the model
    merged with PEFT's `merge_and_unload` (the merge counted in its export time). Both 8da4w, embedding 8w."""
    results = {}
    out = work / "edgec-pte"
    wall, rss = timed([EDGEC, "build", "--model", str(model), "--adapter", str(adapter), "--out", str(out),
                       "--format", "pte", "--quant", "int4", "--embedding-bits", "8", "--force", "--quiet",
                       "--no-validate"])
    results["edgec pte (8da4w, embedding 8w)"] = {"pte": out / "model.pte", "export_s": wall, "export_rss_mb": rss}

    merged = work / "peft-merged"
    merge_wall, merge_rss = timed_peft_merge(model, adapter, merged)
    out = work / "optimum-pte"
    shutil.rmtree(out, ignore_errors=True)
    wall, rss = timed([str(optimum_cli()), "export", "executorch", "--model", str(merged), "--task", "text-generation",
                       "--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache", "--qlinear", "8da4w",
                       "--qembedding", "8w", "--output_dir", str(out)])
    results["optimum-executorch (PEFT-merged)"] = {"pte": next(out.glob("*.pte")), "export_s": wall + merge_wall,
                                                   "export_rss_mb": max(rss, merge_rss)}
    return results


def measure(artifacts: dict[str, dict], rounds: int) -> None:
    """Each round: one 128-token prefill per program, then 128 greedy decode steps with the programs taking
    turns at every step, so that a slow spell of this shared machine lands on both. Decode tokens/s is one
    over the median step time of all rounds; its spread, the slowest and fastest round's."""
    prompt = np.asarray([np.random.default_rng(0).integers(3, SMOLLM2_135M["vocab_size"], PROMPT_TOKENS)])
    # ExecutorchRuntime reads each program's own signature (optimum's takes one position per token and
    # returns every position's logits) and metadata.
    programs = {name: ExecutorchRuntime(Path(a["pte"]).parent, a["pte"]) for name, a in artifacts.items()}
    for program in programs.values():
        program.generate(prompt[0].tolist(), 8)  # warm-up
    prefill = {name: [] for name in programs}
    steps = {name: [] for name in programs}
    round_rates = {name: [] for name in programs}
    for _ in range(rounds):
        last = {}
        for name, program in programs.items():
            started = time.perf_counter()
            last[name] = int(np.argmax(program._run(prompt, 0)))
            prefill[name].append(time.perf_counter() - started)
        this_round = {name: [] for name in programs}
        for position in range(PROMPT_TOKENS, PROMPT_TOKENS + NEW_TOKENS - 1):
            for name, program in programs.items():
                started = time.perf_counter()
                last[name] = int(np.argmax(program._run(np.asarray([[last[name]]]), position)))
                this_round[name].append(time.perf_counter() - started)
        for name, times in this_round.items():
            steps[name] += times
            round_rates[name].append(1 / statistics.median(times))
    for name in programs:
        artifacts[name].update(prefill_ms=1000 * statistics.median(prefill[name]),
                               decode_tps=1 / statistics.median(steps[name]),
                               decode_spread=[min(round_rates[name]), max(round_rates[name])],
                               size_mb=Path(artifacts[name]["pte"]).stat().st_size / 1e6)


def main() -> None:
    rerun_on_huge_pages()
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--work", type=Path, default=SMOLLM2_WORK)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only-measure", action="store_true", help="Reuse the artifacts of the last run.")
    args = parser.parse_args()
    model, adapter = smollm2_with_adapter(args.work)
    record = args.work / "vs_optimum_executorch.json"
    if args.only_measure and record.exists():
        artifacts = json.loads(record.read_text())
    else:
        artifacts = builds(args.work, model, adapter)
    measure(artifacts, args.rounds)
    record.write_text(json.dumps({k: {**v, "pte": str(v["pte"])} for k, v in artifacts.items()}, indent=2))

    print(f"\nSmolLM2-135M-shaped Llama + rank-16 LoRA, 8da4w, ExecuTorch runtime (Python), {os.cpu_count()} CPUs, "
          f"medians of {args.rounds} alternating rounds\n")
    print_artifacts(artifacts)
    ours, ref = list(artifacts.values())
    print("\nedgec vs optimum-executorch:")
    print_ratios(ours, ref, {"decode_tps": ">= 1.10x", "prefill_ms": "<= 1.00x", "size_mb": "<= 1.00x",
                             "export_s": "<= 0.25x", "export_rss_mb": "<= 0.75x"})


if __name__ == "__main__":
    main()
