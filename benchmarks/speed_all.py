"""Every artifact an app might run, side by side: edgec's ONNX int4 bundle (in onnxruntime-genai, also built with
an fp32 prompt graph, and in edgec's own onnxruntime loop) and `.pte`, the GenAI builder's int4 build, optimum-executorch's `.pte` and llama.cpp Q4_0,
on the SmolLM2-135M-shaped Llama + rank-16 LoRA (merged), with the ratios of issue 20's goals:

    python -m benchmarks.speed_all [--work DIR] [--rounds N] [--only-measure]

Each measurement is its own child process (one load, one warm-up, one timed 128-token prefill and 128 greedy
new tokens), the artifacts taking turns in a rotated order each round; medians over the rounds. Every child has
glibc's huge-page malloc, as `edgec bench` gives its agents (runtimes.agent.HUGE_PAGE_MALLOC). Every runner
uses all the machine's cores (onnxruntime-genai through a config overlay: its default is half of them). Builds come
from vs_genai_builder and vs_optimum_executorch (edgec with --no-validate) and llama.cpp's converter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import (BIN, NEW_TOKENS, PROMPT_TOKENS, SMOLLM2_WORK, argument_parser, print_artifacts,
                               print_ratios, rotations, smollm2_with_adapter)
from runtimes.agent import with_huge_page_malloc

PROMPT_GRAPH = "edgec ONNX int4 + fp32 prompt graph (onnxruntime-genai)"
# name -> how a child runs it: a runner kind and the key of the build it runs
ARTIFACTS = {
    "edgec .pte (ExecuTorch)": ("executorch", "edgec pte (8da4w, embedding 8w)"),
    "optimum-executorch .pte (ExecuTorch)": ("executorch", "optimum-executorch (PEFT-merged)"),
    "llama.cpp Q4_0 (llama-bench)": ("llama", "Q4_0"),
    "edgec ONNX int4 (edgec's onnxruntime loop)": ("ort", "edgec int4"),
    "edgec ONNX int4 (onnxruntime-genai)": ("genai", "edgec int4"),
    "builder int4, PEFT-merged (onnxruntime-genai)": ("genai", "builder int4 (PEFT-merged)"),
    PROMPT_GRAPH: ("genai", "edgec int4, fp32 prompt graph"),
}


def prompt_ids(vocab: int = 49152) -> list[int]:
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab, PROMPT_TOKENS).tolist()


def read_bandwidth_gb_s() -> float:
    """Memory read bandwidth now, on all the machine's cores: the median of torch summing 1 GiB of floats."""
    import time

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    data = torch.ones(2**28)
    rates = []
    for _ in range(7):
        started = time.perf_counter()
        data.sum()
        rates.append(data.numel() * 4 / (time.perf_counter() - started) / 1e9)
    return statistics.median(rates)


def last_level_cache_mb() -> float | None:
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
            sizes.append(int(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]] / 1e6)
        except (OSError, ValueError, KeyError):
            continue
    return max(sizes) if sizes else None


def decode_bound(size_mb: float) -> str:
    """How the decode rate stands against reading the artifact's file once a token from memory, at the read
    bandwidth measured now (its own process, after the runs: the machine's speed moves)."""
    cache_mb = last_level_cache_mb()
    if cache_mb and size_mb < cache_mb:
        return f"its {size_mb:.0f} MB file fits this CPU's {cache_mb:.0f} MB last-level cache: no memory bound applies"
    done = subprocess.run([BIN / "python", "-m", __spec__.name, "--child", "bandwidth", "-"], capture_output=True,
                          text=True, check=True)
    read_gb_s = json.loads(done.stdout.strip().splitlines()[-1])["read_gb_s"]
    return (f"at most {read_gb_s * 1e3 / size_mb:.0f} tokens/s reading its file once a token at the {read_gb_s:.0f} "
            f"GB/s measured now")


def child(kind: str, path: str) -> dict:
    """One run in this process: {prefill_ms, decode_tps, rss_mb}, rss_mb the peak of this process, or of
    llama-bench's (this process imports torch to drive it)."""
    import resource

    result = run_once(kind, path)
    who = resource.RUSAGE_CHILDREN if kind == "llama" else resource.RUSAGE_SELF
    return {**result, "rss_mb": resource.getrusage(who).ru_maxrss / 1024}


def run_once(kind: str, path: str) -> dict:
    if kind == "bandwidth":
        return {"read_gb_s": read_bandwidth_gb_s()}
    if kind == "llama":
        from benchmarks.vs_genai_builder import llama_bench

        prefill_ms, decode_tps, _ = llama_bench(Path(path), os.cpu_count() or 1, 1)
        return {"prefill_ms": prefill_ms, "decode_tps": decode_tps}
    if kind == "genai":
        from runtimes.genai import GenaiRuntime

        # genai's own default is half the logical cores: 1 of this machine's 2 (no SMT), while llama-bench,
        # onnxruntime and ExecuTorch use all; every runner gets the machine's cores.
        runtime = GenaiRuntime(path, threads=os.cpu_count() or 1)
        runtime.generate(prompt_ids()[:16], 8, stop_at_eos=False)  # warm-up
        timings: list[float] = []
        steps = len(runtime.generate(prompt_ids(), NEW_TOKENS, stop_at_eos=False, timings=timings))
        return {"prefill_ms": 1000 * timings[0], "decode_tps": steps / timings[1]}
    from runtimes.base import BenchSpec

    if kind == "ort":
        from runtimes.ort import OrtRuntime

        runtime = OrtRuntime(path)
    else:
        from runtimes.executorch import ExecutorchRuntime

        runtime = ExecutorchRuntime(Path(path).parent, path)
    result = runtime.bench(BenchSpec(prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS, warmup=1, repeats=1))
    return {"prefill_ms": 1000 * result.prefill_s, "decode_tps": result.decode_tokens_per_s}


def builds(work: Path) -> dict[str, dict]:
    from benchmarks import vs_genai_builder, vs_optimum_executorch

    model, adapter = smollm2_with_adapter(work)
    built = vs_genai_builder.builds(work, model, adapter, [])
    built.update(vs_optimum_executorch.builds(work, model, adapter))
    built.update(vs_genai_builder.llama_cpp_ggufs(work, work / "peft-merged", ("Q4_0",)))
    built.update(prompt_graph_build(work, model, adapter))
    return entries(built, list(ARTIFACTS))


def prompt_graph_build(work: Path, model: Path, adapter: Path) -> dict[str, dict]:
    """edgec's int4 bundle with --prompt-accuracy-level 1, as vs_genai_builder builds the default one."""
    from benchmarks.vs_genai_builder import edgec_int4

    built = edgec_int4(model, adapter, work / "edgec-int4-prompt-fp32", ["--prompt-accuracy-level", "1"])
    return {"edgec int4, fp32 prompt graph": built}


def entries(built: dict[str, dict], names: list[str]) -> dict[str, dict]:
    out = {}
    for name in names:
        kind, key = ARTIFACTS[name]
        b = built[key]
        path = b.get("pte") or b["dir"]
        size = Path(path).stat().st_size if Path(path).is_file() else \
            sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix in (".onnx", ".data"))
        out[name] = {"kind": kind, "path": str(path), "size_mb": size / 1e6, "export_s": b["export_s"],
                     "export_rss_mb": b["export_rss_mb"]}
    return out


def measure(artifacts: dict[str, dict], rounds: int) -> None:
    samples = {name: [] for name in artifacts}
    for round_index, order in enumerate(rotations(list(artifacts), rounds)):
        for name in order:
            a = artifacts[name]
            # every runner on huge pages, as `edgec bench` runs its agents (llama-bench's too, in the child)
            proc = subprocess.run([BIN / "python", "-m", __spec__.name, "--child", a["kind"], a["path"]],
                                  capture_output=True, text=True, check=True, env=with_huge_page_malloc(os.environ))
            if round_index:  # round 0 warms the machine and the files' page cache
                samples[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for name, a in artifacts.items():
        a["prefill_ms"] = statistics.median(s["prefill_ms"] for s in samples[name])
        rates = [s["decode_tps"] for s in samples[name]]
        a["decode_tps"], a["decode_spread"] = statistics.median(rates), (min(rates), max(rates))
        a["rss_mb"] = statistics.median(s["rss_mb"] for s in samples[name])


def main() -> None:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--work", type=Path, default=SMOLLM2_WORK)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only-measure", action="store_true", help="Reuse the artifacts of the last run.")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    record = args.work / "speed_all.json"
    artifacts = json.loads(record.read_text()) if args.only_measure and record.exists() else builds(args.work)
    missing = [name for name in ARTIFACTS if name not in artifacts]
    if missing == [PROMPT_GRAPH]:  # a record from before the prompt graph: build just that
        artifacts.update(entries(prompt_graph_build(args.work, *smollm2_with_adapter(args.work)), missing))
    elif missing:
        parser.error(f"{record} lacks {', '.join(missing)}: run once without --only-measure")
    measure(artifacts, args.rounds)
    record.write_text(json.dumps(artifacts, indent=2))
    print(f"\nSmolLM2-135M-shaped Llama + rank-16 LoRA merged, prompt {PROMPT_TOKENS}, {NEW_TOKENS} new tokens, greedy, "
          f"{os.cpu_count()} CPUs, each run its own process, medians of {args.rounds} rotated rounds\n")
    print_artifacts(artifacts)
    genai, q4 = artifacts["edgec ONNX int4 (onnxruntime-genai)"], artifacts["llama.cpp Q4_0 (llama-bench)"]
    print("\n1. edgec's ONNX bundle in onnxruntime-genai vs llama.cpp Q4_0:")
    print_ratios(genai, q4, {"decode_tps": ">= 1.00x", "prefill_ms": "<= 1.00x"})
    print("   with the fp32 prompt graph (--prompt-accuracy-level 1):")
    print_ratios(artifacts[PROMPT_GRAPH], q4, {"decode_tps": ">= 1.00x", "prefill_ms": "<= 1.00x"})
    print(f"   its run's peak RSS: {artifacts[PROMPT_GRAPH]['rss_mb']:.0f} MB against {genai['rss_mb']:.0f} MB")
    best = max((a for n, a in artifacts.items() if n.startswith("edgec")), key=lambda a: a["decode_tps"])
    best_name = next(n for n, a in artifacts.items() if a is best)
    print(f"\n2. best edgec artifact, {best_name}: decode {best['decode_tps']:.0f} tokens/s (goal >= 250), "
          f"{decode_bound(best['size_mb'])}; prefill {best['prefill_ms']:.0f} ms (goal <= 60)")
    print("\n3. edgec's default ONNX int4 export vs the GenAI builder's (PEFT-merged, merge included), as the builds "
          f"were timed{' (reused: benchmarks.export_time times this goal alternating)' if args.only_measure else ''}:")
    print_ratios(genai, artifacts["builder int4, PEFT-merged (onnxruntime-genai)"], {"export_s": "<= 1.00x"})


if __name__ == "__main__":
    sys.exit(main())
