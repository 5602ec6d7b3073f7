"""Runtime LoRA against merged bundles and the GenAI builder's `adapter_path` build, in onnxruntime-genai.

One edgec int4 base with rank 8, 16 and 64 adapters on all seven projections (`--lora runtime`), against an
edgec int4 bundle per rank with the adapter merged and the builder's int4 build with the rank-16 adapter
kept as MatMuls (`adapter_path`); alternating rounds, medians. Then what switching costs: loading an
adapter file, activating it and the first token; resident memory per extra loaded adapter; file size
against the adapter's A/B tensors in fp16; each adapter's KL to its reference against the merged build's.

    python -m benchmarks.runtime_lora [--work DIR] [--rounds N] [--lora-dtype fp16|fp32] [--rebuild]
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

from benchmarks.common import (BIN, EDGEC, NEW_TOKENS, PROMPT_TOKENS, ROOT, SMOLLM2_WORK, argument_parser,
                               print_table, rerun_on_huge_pages, rotations, smollm2_shaped, timed)
from compiler.tiny_models import ALL_PROJECTIONS, SMOLLM2_135M, make_adapter
from runtimes.genai import GenaiRuntime

RANKS = (8, 16, 64)
THREADS = os.cpu_count() or 1  # genai's own default is half the logical cores (one of this machine's two)


def adapters(work: Path, model: Path) -> dict[int, Path]:
    made = {}
    for rank in RANKS:
        made[rank] = work / f"lora-r{rank}-all"
        if not (made[rank] / "adapter_config.json").exists():
            print(f"making the rank-{rank} adapter on all seven projections ...", flush=True)
            make_adapter(model, made[rank], target_modules=ALL_PROJECTIONS, r=rank, alpha=2 * rank, seed=rank)
    return made


GATES_OFF = ["--gate", "kl_mean=100", "--gate", "top1_agreement=0", "--gate", "perplexity_ratio=100",
             "--gate", "lora_delta_retention=0"]  # random weights over 30 layers: KL is reported, not gated


def builds(work: Path, model: Path, lora: dict[int, Path], lora_dtype: str, rebuild: bool) -> dict:
    """The runtime bundle and the merged ones (validated: their KL is a figure here), and the builder's
    (which has no validation). A bundle already in `work` is reused unless `rebuild`."""
    record = work / "runtime_lora.json"
    built = json.loads(record.read_text()) if record.exists() and not rebuild else {}

    def build(key: str, out: Path, command: list) -> None:
        if key in built and (out / ("genai_config.json")).exists():
            return
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = timed(command)
        built[key] = {"dir": str(out), "export_s": wall, "export_rss_mb": rss}
        record.write_text(json.dumps(built, indent=2))

    out = work / f"edgec-int4-runtime-lora-{lora_dtype}"
    build(f"runtime {lora_dtype}", out, [EDGEC, "build", "--model", model, "--lora", "runtime", "--lora-dtype", lora_dtype,
                                         *[a for r in RANKS for a in ("--adapter", f"r{r}={lora[r]}")], "--quant", "int4",
                                         "--out", out, "--quiet", "--new-tokens", "8", *GATES_OFF])
    for rank in RANKS:
        out = work / f"edgec-int4-merged-r{rank}"
        build(f"merged r{rank}", out, [EDGEC, "build", "--model", model, "--adapter", lora[rank], "--quant", "int4",
                                       "--out", out, "--quiet", "--new-tokens", "8", *GATES_OFF])
    out = work / "builder-int4-adapter-r16"
    build("builder adapter_path r16", out, [BIN / "python", "-m", "onnxruntime_genai.models.builder", "-i", model, "-o",
                                            out, "-p", "int4", "-e", "cpu", "-c", work / "hf-cache",
                                            "--extra_options", f"adapter_path={lora[16]}"])
    built["runtime"] = built[f"runtime {lora_dtype}"]
    return built


def speed(built: dict, rounds: int) -> dict[str, dict]:
    """Prefill of a 128-token prompt and decode of 128 tokens in onnxruntime-genai, alternating; the runtime
    bundle is one model whose active adapter is set per generation, as an app does."""
    runtime = GenaiRuntime(built["runtime"]["dir"], threads=THREADS)
    rows = {f"runtime r{r}": (runtime, f"r{r}") for r in RANKS}
    rows["runtime, no adapter"] = (runtime, None)
    rows.update({f"merged r{r}": (GenaiRuntime(built[f"merged r{r}"]["dir"], threads=THREADS), None) for r in RANKS})
    rows["builder adapter_path r16"] = (GenaiRuntime(built["builder adapter_path r16"]["dir"], threads=THREADS), None)
    prompt = np.random.default_rng(0).integers(3, SMOLLM2_135M["vocab_size"], PROMPT_TOKENS).tolist()
    samples = {name: {"prefill_s": [], "decode_tps": []} for name in rows}
    for round_index, order in enumerate(rotations(list(rows), rounds)):  # round 0 warms up
        for name in order:
            genai, adapter = rows[name]
            genai.set_adapter(adapter)
            timings: list[float] = []
            steps = len(genai.generate(prompt, NEW_TOKENS, stop_at_eos=False, timings=timings))
            if round_index:
                samples[name]["prefill_s"].append(timings[0])
                samples[name]["decode_tps"].append(steps / timings[1])
    return {name: {"prefill_ms": 1000 * statistics.median(s["prefill_s"]), "decode_tps": statistics.median(s["decode_tps"]),
                   "decode_spread": (min(s["decode_tps"]), max(s["decode_tps"]))} for name, s in samples.items()}


SWITCH_CHILD = """
import json, sys, time
import numpy as np
import onnxruntime_genai as og
bundle, files = sys.argv[1], json.loads(sys.argv[2])
def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
model = og.Model(bundle)
adapters = og.Adapters(model)
prompt = np.arange(3, 19, dtype=np.int32)
def first_token(name):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 1, do_sample=False)
    generator = og.Generator(model, params)
    if name:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(prompt)
    generator.generate_next_token()
    return int(generator.get_next_tokens()[0])
def timed_first_token(name):
    started = time.perf_counter()
    first_token(name)
    return 1000 * (time.perf_counter() - started)
first_token(None)  # warm the session
before = rss_mb()
out = {"rss_base_mb": before, "switch_ms": {}, "load_ms": {}, "first_token_ms": {}}
for name, path in files.items():
    started = time.perf_counter()
    adapters.load(path, name)
    loaded = time.perf_counter()
    first_token(name)
    out["load_ms"][name] = 1000 * (loaded - started)
    out["switch_ms"][name] = 1000 * (time.perf_counter() - started)
out["rss_per_adapter_mb"] = (rss_mb() - before) / len(files)
# The same first token with the adapter already loaded, and with none: what switching adds to it.
out["first_token_ms"] = {name: sorted(timed_first_token(name) for _ in range(5))[2] for name in files}
out["first_token_ms"]["none"] = sorted(timed_first_token(None) for _ in range(5))[2]
json.dump(out, sys.stdout)
"""


def switching(bundle: Path) -> dict:
    """In a fresh process: load + activate + first token (16-token prompt) per adapter, and resident memory
    per loaded adapter."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {a["name"]: str(bundle / a["file"]) for a in manifest["artifacts"][0]["lora"]["adapters"]}
    proc = subprocess.run([BIN / "python", "-c", SWITCH_CHILD, str(bundle), json.dumps(files)], capture_output=True,
                          text=True, check=True, cwd=ROOT)
    return json.loads(proc.stdout)


def main() -> None:
    rerun_on_huge_pages()
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--work", type=Path, default=SMOLLM2_WORK)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rebuild", action="store_true", help="Build every bundle again (default: reuse those in --work).")
    parser.add_argument("--lora-dtype", choices=["fp16", "fp32"], default="fp16", help="The runtime bundle's adapters.")
    args = parser.parse_args()
    model = smollm2_shaped(args.work)
    lora = adapters(args.work, model)
    built = builds(args.work, model, lora, args.lora_dtype, args.rebuild)
    speeds = speed(built, args.rounds)
    switch = switching(Path(built["runtime"]["dir"]))

    print(f"\nSmolLM2-135M-shaped Llama, int4 base, {args.lora_dtype} LoRA on all seven projections, onnxruntime-genai, {os.cpu_count()} "
          f"CPUs, medians of {args.rounds} alternating rounds\n")
    print_table(["artifact", f"prefill {PROMPT_TOKENS} tok (ms)", "decode (tok/s) [min-max]"],
                [[n, f"{s['prefill_ms']:.1f}", f"{s['decode_tps']:.1f} [{s['decode_spread'][0]:.1f}-{s['decode_spread'][1]:.1f}]"]
                 for n, s in speeds.items()])
    print("\nruntime LoRA against the merged bundle of the same rank (decode target >= 0.95x):")
    for rank in RANKS:
        ours, merged = speeds[f"runtime r{rank}"], speeds[f"merged r{rank}"]
        print(f"  r{rank}: decode {ours['decode_tps'] / merged['decode_tps']:.2f}x, prefill time "
              f"{ours['prefill_ms'] / merged['prefill_ms']:.2f}x")
    builder = speeds["builder adapter_path r16"]
    print(f"runtime r16 against the builder's adapter_path build: decode "
          f"{speeds['runtime r16']['decode_tps'] / builder['decode_tps']:.2f}x (target >= 1.1x), prefill time "
          f"{speeds['runtime r16']['prefill_ms'] / builder['prefill_ms']:.2f}x")

    manifest = json.loads((Path(built["runtime"]["dir"]) / "manifest.json").read_text())
    rows = []
    for entry in manifest["artifacts"][0]["lora"]["adapters"]:
        rank = int(entry["name"][1:])
        merged = json.loads((Path(built[f"merged r{rank}"]["dir"]) / "manifest.json").read_text())["validation"]
        rows.append([entry["name"], f"{entry['bytes'] / 1e6:.2f}", f"{entry['bytes'] / entry['tensor_bytes']:.3f}",
                     f"{switch['load_ms'][entry['name']]:.1f}", f"{switch['switch_ms'][entry['name']]:.1f}",
                     f"{switch['first_token_ms'][entry['name']]:.1f}",
                     f"{entry['validation']['metrics']['kl_mean']:.4f}", f"{merged['metrics']['kl_mean']:.4f}"])
    print()
    print_table(["adapter", "file (MB)", "file / its A,B bytes", "load (ms)", "load + activate + first token (ms)",
                 "first token, loaded (ms)", "KL to its reference", "merged bundle's KL"], rows)
    print(f"(first token with no adapter: {switch['first_token_ms']['none']:.1f} ms; prompt of 16 tokens)")
    print(f"\nresident memory per loaded adapter: {switch['rss_per_adapter_mb']:.1f} MB "
          f"(model alone {switch['rss_base_mb']:.0f} MB); runtime bundle built in {built['runtime']['export_s']:.0f} s")


if __name__ == "__main__":
    main()
