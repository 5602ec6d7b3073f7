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
from runtimes.base import sha256_file
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


def genai_greedy_match(bundle: Path, golden_data: dict, adapter: str | None, adapter_file: Path | None = None) -> float:
    """Share of the prompts whose greedy tokens onnxruntime-genai (through its Adapters API) makes equal
    to the reference's."""
    from runtimes.genai import GenaiRuntime

    runtime = GenaiRuntime(bundle, adapter, adapter_file)
    matches = [runtime.generate(list(p), len(t), stop_at_eos=False) == list(t)
               for p, t in zip(golden_data["prompts"], golden_data["tokens"])]
    return float(np.mean(matches))


def adapter_entry(bundle: Path, relative: str, adapter: LoraPairs, stats: dict) -> dict:
    path = bundle / relative
    return {**adapter.describe(), "file": relative, "bytes": path.stat().st_size, "file_sha256": sha256_file(path),
            "parameters": stats["parameters"], "tensor_bytes": stats["tensor_bytes"]}
