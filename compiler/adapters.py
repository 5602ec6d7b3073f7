"""Runtime LoRA in the build: adapters kept apart from the base, their files, their validation, and
`edgec add-adapter` (a new adapter for an existing bundle, the base untouched).

Each adapter is validated against its own reference, the fp32 base with that adapter merged (what
transformers + PEFT computes); "none" (no adapter active) against the base itself.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from compiler.errors import UsageError
from compiler.frontend.lora import AdapterSpec, LoraPairs, read_lora_pairs
from compiler.models.decoder import CanonicalDecoder
from runtimes.base import ADAPTER_DIR, sha256_file
from runtimes.validation import log_softmax


def read_runtime_adapters(checkpoint, specs: list[AdapterSpec]) -> list[LoraPairs]:
    adapters, seen = [], {}
    for spec in specs:
        pairs = read_lora_pairs(checkpoint, spec)
        if pairs.name in seen:
            raise UsageError(f"--adapter {spec.path}: name '{pairs.name}' is also {seen[pairs.name]}'s; "
                             "name them with --adapter NAME=DIR")
        if pairs.name == "none":
            raise UsageError(f"--adapter {spec.path}: 'none' means no adapter; choose another name")
        seen[pairs.name] = spec.path
        adapters.append(pairs)
    return adapters


@contextlib.contextmanager
def adapter_merged(model: CanonicalDecoder, adapter: LoraPairs):
    """The model with the adapter merged in fp32, restored bit for bit afterwards."""
    modules = dict(model.named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for module, _ in adapter.modules.items():
                weight = modules[module].weight
                saved[module] = weight.detach().clone()
                weight.add_(adapter.delta(module))
        yield model
    finally:
        with torch.no_grad():
            for module, original in saved.items():
                modules[module].weight.copy_(original)


def adapter_golden(model: CanonicalDecoder, prompts, new_tokens: int, adapter: LoraPairs, base_golden: dict):
    """(the adapter's golden data, its LoRA reference for delta retention against the base)."""
    from compiler.validate import golden

    with adapter_merged(model, adapter):
        data = golden(model, prompts, new_tokens)
    base = [log_softmax(l) for l in base_golden["logits"]]
    merged = [log_softmax(l) for l in data["logits"]]
    lora = {"base": base, "merged": merged,
            "adapters": [{"path": adapter.name, "delta": [m - b for m, b in zip(merged, base)]}]}
    return data, lora


def genai_greedy_match(runtime, golden_data: dict, adapter: str | None, adapter_file: Path | None = None) -> float:
    """Share of the prompts whose greedy tokens onnxruntime-genai (a runtimes.genai.GenaiRuntime, the adapter
    activated through its Adapters API) makes equal to the reference's."""
    runtime.set_adapter(adapter, adapter_file)
    matches = [runtime.generate(list(p), len(t), stop_at_eos=False) == list(t)
               for p, t in zip(golden_data["prompts"], golden_data["tokens"])]
    return float(np.mean(matches))


def adapter_entry(bundle: Path, relative: str, adapter: LoraPairs, stats: dict) -> dict:
    path = bundle / relative
    return {**adapter.describe(), "file": relative, "bytes": path.stat().st_size, "file_sha256": sha256_file(path),
            "parameters": stats["parameters"], "tensor_bytes": stats["tensor_bytes"]}


def add_adapter(bundle: Path, spec: AdapterSpec, model_dir: Path | None, validate: bool, gates: dict, report) -> dict:
    """Add a runtime LoRA adapter to a bundle built with --lora runtime, the base untouched: check it against
    the bundle's slots, write its file for each artifact, validate it; returns the updated manifest (a failed
    gate is recorded there, and the caller exits 1)."""
    from compiler.build import Reference, headline_validation, validate_adapter
    from compiler.bundle import file_entries, read_manifest, write_manifest
    from compiler.config import BuildConfig
    from compiler.frontend.load import build_decoder, read_checkpoint
    from compiler.models.lora_slots import LoraSlots
    from compiler.onnx.adapter_file import adapter_path, write_onnx_adapter
    from runtimes.validation import GOLDEN_FILE, load_golden

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    artifacts = [a for a in manifest["artifacts"] if (a.get("lora") or {}).get("mode") == "runtime"]
    if not artifacts:
        raise UsageError(f"{bundle}: built with the adapters merged (--lora merge); rebuild it with --lora runtime "
                         "to add adapters")
    name = spec.runtime_name
    if any(a["name"] == name for art in artifacts for a in art["lora"]["adapters"]) or name == "none":
        raise UsageError(f"--adapter {spec.path}: {bundle} already has an adapter named '{name}'; "
                         "choose another with --adapter NAME=DIR")
    config = BuildConfig.from_dict(manifest["build_config"], out=bundle)
    config.validation.gate_overrides.update(gates)
    model_dir = Path(model_dir or config.model.path)
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir}: source model of {bundle} not found; pass --model DIR")
    checkpoint = read_checkpoint(model_dir)
    recorded = manifest["source"]["model"]["sha256"]
    changed = sorted(n for n, d in checkpoint.source_hashes().items() if recorded.get(n) not in (None, d))
    if changed:
        raise UsageError(f"{model_dir}: differs from the base {bundle} was built from ({changed[0]} changed); "
                         "pass the original with --model DIR")
    pairs = read_lora_pairs(checkpoint, spec)
    for artifact in artifacts:
        LoraSlots.from_dict(artifact["lora"]["slots"]).check(pairs, str(spec.path))
    for artifact in artifacts:
        if artifact["format"] == "onnx":
            relative = adapter_path(name)
            stats = write_onnx_adapter(bundle / relative, pairs, LoraSlots.from_dict(artifact["lora"]["slots"]))
        else:
            from compiler.executorch.lora import write_adapter_ptd

            relative = f"{ADAPTER_DIR}/{name}.ptd"
            slots = {m: tuple(v) for m, v in artifact["lora"]["pte_slots"].items()}
            write_adapter_ptd(bundle / relative, slots, pairs.modules)
            stats = pairs.tensor_stats()
        artifact["lora"]["adapters"].append(adapter_entry(bundle, relative, pairs, stats))
    if validate and (bundle / GOLDEN_FILE).exists():
        base_golden = load_golden(bundle / GOLDEN_FILE)
        model = build_decoder(checkpoint)
        reference = Reference(model, checkpoint, [], recorded, base_golden["prompts"], None, golden=base_golden,
                              runtime_adapters=[pairs])
        config.validation.new_tokens = len(base_golden["tokens"][0])
        for artifact in artifacts:
            if artifact.get("validation") is not None:
                validate_adapter(bundle, artifact, artifact["lora"]["adapters"][-1], reference, config, report)
    manifest["build_config"]["adapters"].append(spec.to_dict() | {"name": name})
    manifest["source"]["adapters"].append({"name": name, "path": pairs.path, "weight": pairs.weight,
                                           "sha256": pairs.sha256, "lora": "runtime"})
    manifest["validation"] = headline_validation(manifest["artifacts"])
    manifest["files"] = file_entries(bundle)
    write_manifest(bundle, manifest)
    return manifest
