"""edgec's int4 builds of a 1B-class shape (the Llama-3.2-1B shape by default, random weights, 4.9 GB fp32)
against the GenAI builder's ONNX int4 and optimum-executorch's `.pte` (8da4w, embedding 8w): export wall
time and peak RSS, size, prefill and decode, with issue 18's targets:

    python -m benchmarks.vs_peers_1b [--shape llama-1b|qwen3-1.7b] [--work DIR] [--rounds N] [--only-measure]
                                     [--no-gptq] [--rebuild NAME,...] [--edgec-args ARGS]

Every export is its own child process, one after another, after one read of the weights into the page
cache (wall time from the clock, peak RSS from wait4); edgec builds with --no-validate, as neither peer
validates. Speed: each run its own process (speed_all's child: one load, one warm-up, a 128-token prefill,
128 greedy new tokens), artifacts in rotated order each round, medians. Both `.pte` programs hold a
2048-position KV cache.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from benchmarks.common import (BIN, EDGEC, ONE_B_WORK, QWEN3_1_7B_WORK, argument_parser, llama1b_shaped,
                               print_artifacts, print_ratios, print_table, qwen3_1_7b_shaped, rotations, timed)
from benchmarks.speed_all import measure
from benchmarks.vs_optimum_executorch import optimum_cli

MAX_SEQ_LEN = 2048
# --shape -> (its name in the table, how to make it, default --work)
SHAPES = {"llama-1b": ("Llama-3.2-1B", llama1b_shaped, ONE_B_WORK),
          "qwen3-1.7b": ("Qwen3-1.7B", qwen3_1_7b_shaped, QWEN3_1_7B_WORK)}


EDGEC_OPTIONS: list[str] = []  # --edgec-args


def edgec_build(model: Path, out: Path, *options: str) -> dict:
    wall, rss = timed([EDGEC, "build", "--model", model, "--out", out, "--quant", "int4", "--force", "--quiet",
                       "--no-validate", *options, *EDGEC_OPTIONS])
    pte = out / "model.pte"
    runner = {"kind": "executorch", "path": str(pte)} if pte.exists() else {"kind": "genai", "path": str(out)}
    return {**runner, "export_s": wall, "export_rss_mb": rss}


def builder_int4(model: Path, work: Path) -> dict:
    out = work / "builder-int4"
    shutil.rmtree(out, ignore_errors=True)
    wall, rss = timed([BIN / "python", "-m", "onnxruntime_genai.models.builder", "-i", model, "-o", out, "-p", "int4",
                       "-e", "cpu", "-c", work / "hf-cache"])
    return {"kind": "genai", "path": str(out), "export_s": wall, "export_rss_mb": rss}


def optimum_8da4w(model: Path, work: Path) -> dict:
    out = work / "optimum-pte"
    shutil.rmtree(out, ignore_errors=True)
    wall, rss = timed([optimum_cli(), "export", "executorch", "--model", model, "--task", "text-generation",
                       "--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache", "--qlinear", "8da4w",
                       "--qembedding", "8w", "--max_seq_len", str(MAX_SEQ_LEN), "--output_dir", out])
    return {"kind": "executorch", "path": str(next(out.glob("*.pte"))), "export_s": wall, "export_rss_mb": rss}


PTE = ("--format", "pte", "--embedding-bits", "8", "--max-seq-len", str(MAX_SEQ_LEN))
# name -> how to make it from (model, work); in this order, peers after edgec's builds of their format
BUILDS = {
    "edgec ONNX int4 rtn": lambda model, work: edgec_build(model, work / "edgec-onnx-rtn", "--algo", "rtn"),
    "edgec ONNX int4 gptq": lambda model, work: edgec_build(model, work / "edgec-onnx-gptq"),
    "edgec ONNX int4 gptq + fp32 prompt graph": lambda model, work: edgec_build(
        model, work / "edgec-onnx-gptq-prompt-fp32", "--prompt-accuracy-level", "1"),
    "builder ONNX int4": builder_int4,
    "edgec .pte 8da4w rtn": lambda model, work: edgec_build(model, work / "edgec-pte-rtn", *PTE, "--algo", "rtn"),
    "edgec .pte 8da4w gptq": lambda model, work: edgec_build(model, work / "edgec-pte-gptq", *PTE),
    "optimum-executorch .pte 8da4w": optimum_8da4w,
}


def builds(model: Path, work: Path, names: list[str], built: dict[str, dict], rounds: int = 1) -> dict[str, dict]:
    """Make each of `names` (others stay as `built` has them), timed, `rounds` times in rotated order (export
    wall: the median; peak RSS: the largest); then every artifact's size."""
    # Read once first, so that no export pays for a cold page cache and the next for a warm one.
    for file in model.glob("*.safetensors"):
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass
    walls: dict[str, list[float]] = {name: [] for name in names}
    for order in list(rotations(names, rounds))[1:] if rounds > 1 else [names]:
        for name in order:
            print(f"{name} ...", flush=True)
            rss = built.get(name, {}).get("export_rss_mb", 0) if walls[name] else 0
            built[name] = BUILDS[name](model, work)
            walls[name].append(built[name]["export_s"])
            built[name].update(export_s=statistics.median(walls[name]), export_walls_s=walls[name],
                               export_rss_mb=max(rss, built[name]["export_rss_mb"]))
    for a in built.values():
        path = Path(a["path"])
        files = [path] if path.is_file() else [f for f in path.iterdir() if f.suffix in (".onnx", ".data")]
        a["size_mb"] = sum(f.stat().st_size for f in files) / 1e6
    return dict(sorted(built.items(), key=lambda item: list(BUILDS).index(item[0])))


def main() -> None:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-1b")
    parser.add_argument("--work", type=Path, help="Where the model and builds go [~/.cache/edgec/bench-SHAPE].")
    parser.add_argument("--rounds", type=int, default=3, help="Speed rounds; 0: the exports alone.")
    parser.add_argument("--only-measure", action="store_true", help="Reuse the artifacts of the last run.")
    parser.add_argument("--no-gptq", action="store_true", help="Skip edgec's GPTQ builds (the slow ones).")
    parser.add_argument("--rebuild", metavar="NAME,...",
                        help="Make only these again, keeping the last run's other builds (names as in the table).")
    parser.add_argument("--export-rounds", type=int, default=1, help="Time each export this many times, "
                        "alternating (median wall, largest RSS).")
    parser.add_argument("--edgec-args", default="", help="More `edgec build` options, e.g. '--memory-budget 6GB'.")
    args = parser.parse_args()
    EDGEC_OPTIONS[:] = args.edgec_args.split()
    shape, make, work = SHAPES[args.shape]
    args.work = args.work or work
    record = args.work / "vs_peers_1b.json"
    last = json.loads(record.read_text()) if record.exists() else {}
    if args.only_measure:
        names = []
    elif args.rebuild:
        names = [n.strip() for n in args.rebuild.split(",")]
        if unknown := [n for n in names if n not in BUILDS]:
            parser.error(f"--rebuild: no build named {unknown[0]!r} (names: {', '.join(BUILDS)})")
    else:
        names, last = [n for n in BUILDS if not (args.no_gptq and "gptq" in n)], {}
    artifacts = builds(make(args.work), args.work, names, last, args.export_rounds)
    record.write_text(json.dumps(artifacts, indent=2))
    if not args.rounds:
        print_table(["artifact", "size (MB)", "export (s)", "export peak RSS (MB)"],
                    [[n, f"{a['size_mb']:.1f}", f"{a['export_s']:.1f}", f"{a['export_rss_mb']:.0f}"]
                     for n, a in artifacts.items()])
        return
    measure(artifacts, args.rounds)
    record.write_text(json.dumps(artifacts, indent=2))

    print(f"\n{shape}-shaped, random weights, int4, prompt 128, 128 new tokens, greedy, {os.cpu_count()} CPUs, "
          f"each run its own process, medians of {args.rounds} rotated rounds\n")
    print_artifacts(artifacts)
    builder, optimum = artifacts.get("builder ONNX int4"), artifacts.get("optimum-executorch .pte 8da4w")
    targets = {
        "edgec ONNX int4 rtn": (builder, {"export_rss_mb": "<= 0.60x", "export_s": "<= 1.00x",
                                          "prefill_ms": "<= 1.00x", "decode_tps": ">= 1.00x"}),
        "edgec ONNX int4 gptq": (builder, {"export_rss_mb": "<= 0.60x", "export_s": "<= 2.00x",
                                           "prefill_ms": "<= 1.00x", "decode_tps": ">= 1.00x"}),
        "edgec ONNX int4 gptq + fp32 prompt graph": (builder, {"prefill_ms": "<= 1.00x", "decode_tps": ">= 1.00x",
                                                               "rss_mb": None}),
        "edgec .pte 8da4w rtn": (optimum, {"export_rss_mb": "<= 0.50x", "export_s": "<= 0.25x",
                                           "prefill_ms": "<= 1.00x", "decode_tps": ">= 1.00x"}),
        "edgec .pte 8da4w gptq": (optimum, {"export_rss_mb": "<= 0.50x", "export_s": "<= 0.25x",
                                            "prefill_ms": "<= 1.00x", "decode_tps": ">= 1.00x"}),
    }
    for name, (peer, wanted) in targets.items():
        if name in artifacts and peer is not None:
            peer_name = next(n for n, a in artifacts.items() if a is peer)
            print(f"\n{name} vs {peer_name}:")
            print_ratios(artifacts[name], peer, {"size_mb": None, **wanted})


if __name__ == "__main__":
    sys.exit(main())
