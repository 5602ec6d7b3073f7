"""edgec's default int4 ONNX build against the ONNX Runtime GenAI model builder's default int4 CPU build.

Speed in onnxruntime-genai (alternating rounds), size and export cost, on the SmolLM2-135M-shaped Llama + rank-16 LoRA:

    python -m benchmarks.vs_genai_builder [--work DIR] [--rounds N] [--only-measure] [--edgec-args ARGS] [--llama-cpp]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

import numpy as np

from benchmarks.common import (BIN, CACHE, EDGEC, NEW_TOKENS, PROMPT_TOKENS, SMOLLM2_WORK, argument_parser,
                               print_artifacts, print_ratios, rerun_on_huge_pages, rotations, smollm2_with_adapter, timed,
                               timed_peft_merge)
from compiler.tiny_models import SMOLLM2_135M
from runtimes.genai import GenaiRuntime


def builds(work: Path, model: Path, adapter: Path, edgec_args: list[str]) -> dict[str, dict]:
    """edgec (with --no-validate, as the builder does no validation), and the builder both ways a user can run
    it: with the adapter through its `adapter_path` option (LoRA kept as extra MatMuls), and on the model
    merged first with PEFT's `merge_and_unload`. Each export is its own child process."""
    python = str(BIN / "python")
    results = {"edgec int4" + (f" ({' '.join(edgec_args)})" if edgec_args else ""):
               edgec_int4(model, adapter, work / "edgec-int4", edgec_args)}

    out = work / "builder-int4-adapter"
    shutil.rmtree(out, ignore_errors=True)
    wall, rss = timed([python, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out), "-p", "int4",
                       "-e", "cpu", "-c", str(work / "hf-cache"), "--extra_options", f"adapter_path={adapter}"])
    results["builder int4 (adapter_path)"] = {"dir": out, "export_s": wall, "export_rss_mb": rss}

    merged = work / "peft-merged"
    merge_wall, merge_rss = timed_peft_merge(model, adapter, merged)
    out = work / "builder-int4-merged"
    shutil.rmtree(out, ignore_errors=True)
    wall, rss = timed([python, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(out), "-p", "int4",
                       "-e", "cpu", "-c", str(work / "hf-cache")])
    results["builder int4 (PEFT-merged)"] = {"dir": out, "export_s": wall + merge_wall,
                                             "export_rss_mb": max(rss, merge_rss)}
    return results


def edgec_int4(model: Path, adapter: Path, out: Path, edgec_args: list[str]) -> dict:
    """edgec's int4 bundle of the model with the adapter merged, unvalidated (the builder validates nothing)."""
    wall, rss = timed([EDGEC, "build", "--model", str(model), "--adapter", str(adapter), "--out", str(out),
                       "--quant", "int4", "--force", "--quiet", "--no-validate", *edgec_args])
    return {"dir": out, "export_s": wall, "export_rss_mb": rss}


def size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in (".onnx", ".data")) / 1e6


def measure(artifacts: dict[str, dict], rounds: int) -> None:
    """Every artifact in onnxruntime-genai, in this process, alternating: prefill time for a 128-token prompt
    and decode tokens/s for 128 new tokens (medians), and file size."""
    # Every bundle on all cores: genai's own default is half the logical cores (one of this machine's two).
    runtimes = {name: GenaiRuntime(a["dir"], threads=os.cpu_count() or 1) for name, a in artifacts.items()}
    prompt = np.random.default_rng(0).integers(3, SMOLLM2_135M["vocab_size"], PROMPT_TOKENS).tolist()
    samples = {name: {"prefill_s": [], "decode_tps": []} for name in artifacts}
    for round_index, order in enumerate(rotations(list(artifacts), rounds)):  # round 0 warms up
        for name in order:
            timings: list[float] = []
            steps = len(runtimes[name].generate(prompt, NEW_TOKENS, stop_at_eos=False, timings=timings))
            if round_index:
                samples[name]["prefill_s"].append(timings[0])
                samples[name]["decode_tps"].append(steps / timings[1])
    for name, a in artifacts.items():
        a["prefill_ms"] = 1000 * statistics.median(samples[name]["prefill_s"])
        a["decode_tps"] = statistics.median(samples[name]["decode_tps"])
        a["decode_spread"] = (min(samples[name]["decode_tps"]), max(samples[name]["decode_tps"]))
        a["size_mb"] = size_mb(a["dir"])


LLAMA_CPP_PYTHON = "0.3.36"  # its source distribution on PyPI vendors llama.cpp
LLAMA_CPP_FLAGS = [  # GGML_NATIVE dies with "Illegal instruction" on this machine (PLATFORM-NOTES)
    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AVX512=ON",
    "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DLLAMA_CURL=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
]
# llama.cpp's converter refuses a locally trained BPE tokenizer it has no hash for; llama-bench feeds random
# ids, so the pre-tokenizer is declared 'default'. Its code stays in the cache directory, never in the tree.
CONVERT = """import sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""


def llama_cpp_tree(cache: Path) -> Path:
    """Download llama-cpp-python's sdist and build llama-bench and llama-quantize once, outside the tree."""
    import subprocess
    import tarfile

    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (root / "build" / "bin" / "llama-bench").exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(BIN / "pip"), "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)], check=True)
    with tarfile.open(cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as archive:
        archive.extractall(cache, filter="data")
    subprocess.run(["cmake", "-B", "build", *LLAMA_CPP_FLAGS], cwd=root, check=True)
    subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count()), "--target", "llama-bench",
                    "llama-quantize"], cwd=root, check=True)
    return root


def llama_cpp_ggufs(work: Path, merged: Path, qtypes: tuple[str, ...]) -> dict[str, dict]:
    """The PEFT-merged model converted to GGUF f16 and quantized to each qtype: qtype -> its file and export cost."""
    root = llama_cpp_tree(CACHE / "llama.cpp")
    f16 = work / "llama-f16.gguf"
    convert_s, convert_rss = timed([BIN / "python", "-c", CONVERT, str(root), str(merged), "--outtype", "f16",
                                    "--outfile", str(f16)])
    out = {}
    for qtype in qtypes:
        gguf = work / f"llama-{qtype}.gguf"
        quant_s, quant_rss = timed([str(root / "build" / "bin" / "llama-quantize"), str(f16), str(gguf), qtype])
        out[qtype] = {"dir": gguf, "size_mb": gguf.stat().st_size / 1e6, "export_s": convert_s + quant_s,
                      "export_rss_mb": max(convert_rss, quant_rss)}
    return out


def llama_bench(gguf: Path, threads: int, repeats: int) -> tuple[float, float, float]:
    """llama-bench's (prefill ms for PROMPT_TOKENS, decode tokens/s for NEW_TOKENS, decode's stddev)."""
    import subprocess

    root = llama_cpp_tree(CACHE / "llama.cpp")
    env = {**os.environ, "LD_LIBRARY_PATH": str(root / "build" / "bin")}
    proc = subprocess.run([str(root / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-p", str(PROMPT_TOKENS),
                           "-n", str(NEW_TOKENS), "-t", str(threads), "-r", str(repeats), "-o", "json"],
                          capture_output=True, text=True, env=env, check=True)
    results = json.loads(proc.stdout)
    prefill = next(r for r in results if r["n_prompt"] == PROMPT_TOKENS and r["n_gen"] == 0)
    decode = next(r for r in results if r["n_gen"] == NEW_TOKENS and r["n_prompt"] == 0)
    return 1000 * PROMPT_TOKENS / prefill["avg_ts"], decode["avg_ts"], decode["stddev_ts"]


def llama_cpp_rows(work: Path, merged: Path, threads: int, repeats: int) -> dict[str, dict]:
    """Q4_0 and Q4_K_M of the PEFT-merged model through llama-bench (its own runner, -t = our threads)."""
    rows = {}
    for qtype, built in llama_cpp_ggufs(work, merged, ("Q4_0", "Q4_K_M")).items():
        prefill_ms, decode_tps, stddev = llama_bench(built["dir"], threads, repeats)
        rows[f"llama.cpp {qtype} (llama-bench)"] = {**built, "prefill_ms": prefill_ms, "decode_tps": decode_tps,
                                                    "decode_spread": (decode_tps - stddev, decode_tps + stddev)}
    return rows


def main() -> None:
    rerun_on_huge_pages()
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--work", type=Path, default=SMOLLM2_WORK)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only-measure", action="store_true", help="Reuse the artifacts of the last run.")
    parser.add_argument("--edgec-args", default="", help="Extra `edgec build` options, e.g. '--algo gptq --block-size 128'.")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="Also build llama.cpp (once, in ~/.cache/edgec) and add Q4_0 / Q4_K_M rows from llama-bench.")
    args = parser.parse_args()
    model, adapter = smollm2_with_adapter(args.work)
    record = args.work / "vs_genai_builder.json"
    if args.only_measure and record.exists():
        artifacts = {k: {**v, "dir": Path(v["dir"])} for k, v in json.loads(record.read_text()).items()}
    else:
        artifacts = builds(args.work, model, adapter, args.edgec_args.split())
    measure(artifacts, args.rounds)
    if args.llama_cpp:
        artifacts.update(llama_cpp_rows(args.work, args.work / "peft-merged", os.cpu_count() or 1, args.rounds))
    record.write_text(json.dumps({k: {**v, "dir": str(v["dir"])} for k, v in artifacts.items()}, indent=2))

    builders = [k for k in artifacts if k.startswith("builder")]
    strongest = max(builders, key=lambda k: artifacts[k]["decode_tps"])
    ours = next(a for k, a in artifacts.items() if k.startswith("edgec"))
    ref = artifacts[strongest]
    print(f"\nSmolLM2-135M-shaped Llama + rank-16 LoRA, each tool's default int4, onnxruntime-genai, {os.cpu_count()} CPUs, "
          f"medians of {args.rounds} alternating rounds\n")
    print_artifacts(artifacts)
    print(f"\nedgec vs the stronger builder artifact ({strongest}):")
    print_ratios(ours, ref, {"decode_tps": ">= 1.15x", "prefill_ms": "<= 0.90x", "size_mb": "<= 1.00x",
                             "export_s": "<= 1.00x", "export_rss_mb": "<= 1.00x"})
    q4 = artifacts.get("llama.cpp Q4_0 (llama-bench)")
    if q4:
        print("\nedgec (in onnxruntime-genai) vs llama.cpp Q4_0 (in llama-bench; each runner its own loop):")
        print_ratios(ours, q4, {"decode_tps": None, "prefill_ms": None})


if __name__ == "__main__":
    main()
