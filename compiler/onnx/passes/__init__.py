"""Named ONNX pass pipelines, and the runner that times each pass and reports its rewrites.

A pass is an onnx_ir pass (`call(model) -> PassResult`), one per file; fusions are onnxscript rewrite
rules. `run_passes` records for each pass its wall time, node counts before and after, and rewrites per
rule, optionally saves the model after each pass (--dump-dir), and names the pass when one fails.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir

from compiler.config import QuantConfig
from compiler.errors import EdgecError
from compiler.models.decoder import DecoderConfig
from compiler.onnx.passes.base import CountingPass
from compiler.onnx.passes.cleanup import CleanupPass
from compiler.onnx.passes.fuse_gqa import FuseGroupQueryAttentionPass
from compiler.onnx.passes.fuse_rms_norm import FuseRmsNormPass
from compiler.onnx.passes.fuse_rotary import FuseRotaryEmbeddingPass
from compiler.onnx.passes.fuse_skip_rms_norm import FuseSkipRmsNormPass
from compiler.onnx.passes.lora_slots import LoraSlotsPass
from compiler.onnx.passes.pack_qkv import PackQkvPass
from compiler.onnx.passes.quantize_weights import QuantizeWeightsPass

PIPELINES = ("none", "fuse", "fuse+int4", "int4")


def fusion_passes(cfg: DecoderConfig) -> list[CountingPass]:
    return [
        CleanupPass(rewrite_rules=False),
        FuseRmsNormPass(),
        FuseSkipRmsNormPass(),
        FuseRotaryEmbeddingPass(cfg.max_sequence_length),
        FuseGroupQueryAttentionPass(cfg.rotary_dim),
        PackQkvPass(),
        # Inlines what a fusion started but a later one did not consume, and drops dead nodes.
        CleanupPass(),
    ]


def build_pipeline(name: str, cfg: DecoderConfig, quant: QuantConfig | None = None,
                   precomputed: dict | None = None, lora_slots=None) -> list[CountingPass]:
    """lora_slots (runtime LoRA): a LoraSlots whose branches go in last, on the packed, quantized graph."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}")
    passes = fusion_passes(cfg) if "fuse" in name else []
    if "int4" in name:
        passes.append(QuantizeWeightsPass(quant or QuantConfig(), precomputed))
    if lora_slots is not None:
        passes.append(LoraSlotsPass(lora_slots))
    return passes


def op_counts(model: ir.Model) -> dict[str, int]:
    return dict(Counter(node.op_type for node in model.graph).most_common())


def attention_by_layer(model: ir.Model, num_layers: int) -> list[str]:
    """Per layer, what its attention runs as: GroupQueryAttention, MultiHeadAttention, or MatMul (unfused),
    found from the node writing its present key and the nodes reading that (the KV concat's head expansion)."""
    producers = {v.name: v.producer() for v in model.graph.outputs}
    kinds = []
    for i in range(num_layers):
        node = producers.get(f"present.{i}.key")
        found, frontier = "MatMul", [node] if node is not None else []
        for _ in range(8):  # Concat -> Unsqueeze -> Expand -> Reshape -> (Transpose -> Reshape) -> attention
            if found != "MatMul" or not frontier:
                break
            for n in frontier:
                if n.op_type in ("GroupQueryAttention", "MultiHeadAttention") and n.domain == "com.microsoft":
                    found = n.op_type
            frontier = [use.node for n in frontier for v in n.outputs for use in v.uses()]
        kinds.append(found)
    return kinds


def run_passes(model: ir.Model, passes: list[CountingPass], dump_dir: Path | None = None,
               progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[ir.Model, list[dict]]:
    """progress(done, total): passes run."""
    records = []
    for index, p in enumerate(passes):
        name = type(p).__name__
        nodes_before = len(model.graph)
        started = time.perf_counter()
        try:
            result = p(model)
        except Exception as e:  # a pass bug: say which pass, keep the cause for --debug
            raise EdgecError(f"ONNX pass {name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        model = result.model
        records.append({
            "pass": name,
            "seconds": round(time.perf_counter() - started, 3),
            "nodes_before": nodes_before,
            "nodes_after": len(model.graph),
            "modified": bool(result.modified),
            "rewrites": dict(p.counts),
        })
        if dump_dir is not None:
            dump_dir.mkdir(parents=True, exist_ok=True)
            path = dump_dir / f"{index + 1:02d}-{name}.onnx"
            ir.save(model, str(path), external_data=path.name + ".data")
        progress(index + 1, len(passes))
    return model, records
