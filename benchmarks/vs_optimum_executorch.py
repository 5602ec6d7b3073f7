"""edgec's .pte against optimum-executorch's, from the same weights, measured in one process, alternating.

Same weights as benchmarks/vs_genai_builder.py: a 30-layer SmolLM2-135M-shaped Llama (random weights) with
a rank-16 LoRA adapter on all seven projections. optimum-executorch takes a Hugging Face model, so it gets
the PEFT-merged model (`merge_and_unload`, the merge counted in its export time); edgec merges itself.
optimum-executorch pins transformers 5.0.0rc1, so it lives in its own virtual environment,
~/.cache/edgec/optimum-executorch-venv (made on first use), and runs:

    optimum-cli export executorch --task text-generation --recipe xnnpack --use_custom_sdpa
        --use_custom_kv_cache --qlinear 8da4w --qembedding 8w

edgec: `edgec build --format pte --quant int4 --embedding-bits 8 --no-validate` (8da4w linears too). Both
programs then run in ExecuTorch's Python runtime in this process, alternating (decode steps take turns
token by token): prefill time for a 128-token prompt, decode tokens/s over 128 new tokens (medians), file
size, export wall time and peak RSS.

    .venv/bin/python benchmarks/vs_optimum_executorch.py [--work DIR] [--rounds N] [--only-measure]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.vs_genai_builder import BIN, print_table, smollm2_with_adapter, timed  # noqa: E402
from compiler.fixtures import SMOLLM2_135M  # noqa: E402
from runtimes.executorch import ExecutorchRuntime  # noqa: E402

OPTIMUM_VENV = Path.home() / ".cache" / "edgec" / "optimum-executorch-venv"
OPTIMUM_PINS = ["torch==2.13.0", "executorch==1.5.1", "torchao==0.18.0", "optimum-executorch==1.1.0"]
PROMPT_TOKENS = 128
NEW_TOKENS = 128


def optimum_cli() -> Path:
    cli = OPTIMUM_VENV / "bin" / "optimum-cli"
    if not cli.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OPTIMUM_VENV)], check=True)
        subprocess.run([str(OPTIMUM_VENV / "bin" / "pip"), "install", "-q", *OPTIMUM_PINS], check=True)
    return cli


def builds(work: Path, model: Path, adapter: Path) -> dict[str, dict]:
    results = {}
    out = work / "edgec-pte"
    wall, rss = timed([str(BIN / "edgec"), "build", "--model", str(model), "--adapter", str(adapter), "--out", str(out),
                       "--format", "pte", "--quant", "int4", "--embedding-bits", "8", "--force", "--quiet",
                       "--no-validate"])
    results["edgec pte (8da4w, embedding 8w)"] = {"pte": out / "model.pte", "export_s": wall, "export_rss_mb": rss}

    merged = work / "peft-merged"
    shutil.rmtree(merged, ignore_errors=True)
    merge_wall, merge_rss = timed([str(BIN / "python"), "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                   "from benchmarks.vs_genai_builder import merge_with_peft; from pathlib import Path; "
                                   "merge_with_peft(*map(Path, sys.argv[2:]))", str(ROOT), str(model), str(adapter),
                                   str(merged)])
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
    programs = {name: ExecutorchRuntime(Path(a["pte"]).parent, program_path=a["pte"]) for name, a in artifacts.items()}
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgec" / "bench-smollm2")
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
    print_table(artifacts)
    ours, ref = list(artifacts.values())
    print("\nedgec vs optimum-executorch:")
    print(f"  decode tokens/s   {ours['decode_tps'] / ref['decode_tps']:.2f}x  (target >= 1.10x)")
    print(f"  prefill time      {ours['prefill_ms'] / ref['prefill_ms']:.2f}x  (target <= 1.00x)")
    print(f"  size              {ours['size_mb'] / ref['size_mb']:.2f}x  (target <= 1.00x)")
    print(f"  export wall time  {ours['export_s'] / ref['export_s']:.2f}x  (target <= 0.25x)")
    print(f"  export peak RSS   {ours['export_rss_mb'] / ref['export_rss_mb']:.2f}x  (target <= 0.75x)")


if __name__ == "__main__":
    main()
