"""`edgec demo`: the main job on an embedded default, offline, with a readable summary."""

from __future__ import annotations

import sys
from pathlib import Path

from compiler import __version__
from compiler.config import default_cache_dir

DEMO_MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True)


def _table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    rule = "-" * (width + value_width + 3)
    return "\n".join([title, rule, *(f"{k.ljust(width)} | {v}" for k, v in rows), rule])


def run_demo(cache_dir: Path | None = None) -> str:
    from compiler.build import build
    from compiler.config import BuildConfig, ModelConfig
    from compiler.frontend.lora import AdapterSpec
    from compiler.report import BuildReport
    from compiler.tiny_models import ALL_PROJECTIONS, make_adapter, make_model
    from devices.bench import run_bench
    from runtimes.base import BenchSpec

    root = (cache_dir or default_cache_dir()) / f"demo-{__version__}"
    model_dir, adapter_dir, bundle_dir = root / "smol-llama", root / "smol-llama-lora", root / "bundle"
    if not (model_dir / "config.json").exists():
        print("  making a small Llama-family model (random weights) ...", file=sys.stderr, flush=True)
        make_model(model_dir, "llama", **DEMO_MODEL)
    if not (adapter_dir / "adapter_config.json").exists():
        print("  making a rank-8 LoRA adapter on all projections ...", file=sys.stderr, flush=True)
        make_adapter(model_dir, adapter_dir, target_modules=ALL_PROJECTIONS, r=8, alpha=16)

    config = BuildConfig(model=ModelConfig(model_dir), out=bundle_dir, adapters=[AdapterSpec(adapter_dir)])
    report = BuildReport()
    out, manifest = build(config, report)
    print("  benchmarking in a fresh onnxruntime process ...", file=sys.stderr, flush=True)
    result = run_bench(out, BenchSpec(prompt_tokens=64, new_tokens=64, warmup=1, repeats=3))

    summary = report.to_dict()
    metrics = manifest["validation"]["metrics"]
    adapter = summary["adapters"][0]
    export_s = next(s["seconds"] for s in summary["stages"] if s["stage"] == "export_onnx")
    size = sum(f["bytes"] for f in manifest["files"].values())
    m = manifest["model"]
    rows = [
        ("model", f"Llama-family, {m['num_layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']} ({model_dir})"),
        ("adapter", f"rank {adapter['modules'][0]['rank']}, {adapter['modules_merged']} modules merged ({adapter_dir})"),
        ("bundle", f"{out} ({size / 1e6:.1f} MB, ONNX fp32 + genai_config.json)"),
        ("build", f"{summary['wall_s']:.1f} s in all, export {export_s:.1f} s, peak RSS {summary['peak_rss_mb']:.0f} MB"),
        ("validation", "PASSED" if manifest["validation"]["passed"] else "FAILED"),
        ("  logits max-abs error", f"{metrics['max_abs_logits']:.2e}"),
        ("  top-1 agreement", f"{metrics['top1_agreement']:.3f}"),
        ("  KL divergence (mean)", f"{metrics['kl_mean']:.2e}"),
        ("  greedy tokens identical", f"{metrics['greedy_match'] * 100:.0f}% of {manifest['validation']['new_tokens']}"),
        ("load time", f"{result['load_s'] * 1000:.0f} ms"),
        ("time to first token (64-token prompt)", f"{result['ttft_s'] * 1000:.1f} ms"),
        ("prefill", f"{result['prefill_tokens_per_s']:.0f} tokens/s"),
        ("decode", f"{result['decode_tokens_per_s']:.1f} tokens/s"),
        ("peak RSS while running", f"{result['peak_rss_mb']:.0f} MB"),
    ]
    return _table(rows, "edgec demo summary") + f"\nnext: edgec inspect {out}   |   edgec bench {out} --json"
