"""Canonical decoder -> ONNX (the graph the dynamo ONNX exporter traces, written by layer_graph.py or traced),
KV cache as explicit I/O.

Inputs: input_ids, attention_mask, position_ids, past_key_values.N.key/value;
outputs: logits (every position's, or with last_position_logits the last one's), present.N.key/value.
Batch, sequence and past lengths are dynamic.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import torch

from compiler.models.decoder import CanonicalDecoder
from compiler.onnx.layer_graph import BATCH, PAST, SEQUENCE, TOTAL, write_decoder
from compiler.onnx.layer_template import TemplateMismatch, stamp_layers
from compiler.onnx.trace_ahead import TraceAhead


@dataclass(frozen=True)
class OnnxIO:
    """Names and layout of the decoder's inputs and outputs, recorded in the manifest for any runner."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    last_position_logits: bool = False  # logits [batch, 1, vocab]: the lm_head on the last position only

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names]

    def describe(self, shares_buffer: bool = False) -> dict:
        kv_shape = [BATCH, self.num_kv_heads, PAST, self.head_dim]
        inputs = [
            {"name": "input_ids", "dtype": "int64", "shape": [BATCH, SEQUENCE]},
            {"name": "attention_mask", "dtype": "int64", "shape": [BATCH, TOTAL]},
            {"name": "position_ids", "dtype": "int64", "shape": [BATCH, SEQUENCE]},
        ] + [{"name": n, "dtype": "float32", "shape": kv_shape} for n in self.past_names]
        present_shape = [BATCH, self.num_kv_heads, TOTAL, self.head_dim]
        positions = 1 if self.last_position_logits else SEQUENCE
        outputs = [{"name": "logits", "dtype": "float32", "shape": [BATCH, positions, self.vocab_size]}] + [
            {"name": n, "dtype": "float32", "shape": present_shape} for n in self.present_names
        ]
        return {
            "inputs": inputs,
            "outputs": outputs,
            "kv_cache": {
                "layout": "BNSH",
                "num_layers": self.num_layers,
                "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "dtype": "float32",
                "past_key": "past_key_values.%d.key",
                "past_value": "past_key_values.%d.value",
                "present_key": "present.%d.key",
                "present_value": "present.%d.value",
                # True: past and present may be one [batch, heads, context, head_dim] buffer
                # (GroupQueryAttention reads lengths from position_ids), as onnxruntime-genai runs it.
                "shares_buffer": shares_buffer,
            },
        }


def io_for(model: CanonicalDecoder, last_position_logits: bool = False) -> OnnxIO:
    cfg = model.cfg
    return OnnxIO(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, last_position_logits)


def _example_inputs(model: CanonicalDecoder):
    # Sizes >= 2 so torch.export does not specialise a dynamic dimension to 0 or 1.
    cfg = model.cfg
    batch, seq, past = 2, 3, 4
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    cache = [torch.zeros(batch, cfg.num_kv_heads, past, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
    return (ids, mask, positions, *cache)


def _name_dims(model: ir.Model) -> None:
    """Give the exporter's generated symbols (s53, 'past + seq') the names onnxruntime-genai's models use."""
    known = {BATCH, SEQUENCE, PAST}
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is None:
            continue
        dims = []
        for dim in value.shape:
            if isinstance(dim, ir.SymbolicDim) and dim.value not in known:
                dims.append(ir.SymbolicDim(TOTAL))
            else:
                dims.append(dim)
        value.shape = ir.Shape(dims)


def one_layer_config(cfg):
    """The configuration the layer template is traced with: layer 0 alone."""
    return dataclasses.replace(cfg, num_layers=1, layer_rope=cfg.layer_rope[:1])


def one_layer_view(model: CanonicalDecoder) -> CanonicalDecoder:
    """A 1-layer decoder sharing the model's embedding, layer 0, norm and head tensors (no copies)."""
    cfg = one_layer_config(model.cfg)
    with torch.device("meta"):
        view = CanonicalDecoder(cfg)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("model.layers.") or k.startswith("model.layers.0.")}
    view.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        view.lm_head.weight = view.model.embed_tokens.weight
    view.rope_inv_freq = model.rope_inv_freq
    view.local_rope_inv_freq = model.local_rope_inv_freq
    return view.eval()


def export_onnx(model: CanonicalDecoder, layer_template: bool = True, last_position_logits: bool = False,
                trace_cache: Path | None = None, ahead: TraceAhead | None = None,
                write_layer: bool | None = None) -> ir.Model:
    """The decoder as ONNX. With layer_template, one layer's graph is made and stamped for every layer (see
    layer_template.py). The graph is written without tracing (layer_graph.py) where that covers the
    configuration and write_layer allows (None: unless EDGEC_WRITE_LAYER=0); otherwise it is traced.
    last_position_logits: logits of the last position only; trace_cache: a directory where the one-layer
    trace is kept for the next build of this architecture (trace_cache.py); ahead: that trace, being made
    by a child process (trace_ahead.py). The model's meta "edgec.trace" says how the graph was made:
    "one layer, written", "cached", "one layer, traced ahead", "one layer", "every layer, written" or
    "every layer"."""
    log = logging.getLogger("edgec")
    write = writes_layer(write_layer)
    if layer_template and len(set(model.cfg.layer_rope)) > 1:
        # Layer 0's copies would rotate every layer as layer 0 does (the rope tables are not layer weights,
        # so stamping's checks cannot see it): layers of SmolLM3 (no rope) or Gemma 3 (local/global) differ.
        log.info("not stamping one layer: layers use different rope (%s)",
                 ", ".join(sorted(set(model.cfg.layer_rope))))
        layer_template = False
    if layer_template and model.cfg.num_layers > 1:
        view = one_layer_view(model)
        onnx_model = write_decoder(view, last_position_logits) if write else None
        if onnx_model is None:
            onnx_model = _template_trace(view, last_position_logits, trace_cache, ahead)
        else:
            onnx_model.meta["edgec.trace"] = "one layer, written"
            if ahead is not None:
                ahead.close()
        try:
            stamp_layers(onnx_model, model)
            return onnx_model
        except TemplateMismatch as e:
            log.warning("not stamping one layer (%s): making every layer's graph", e)
    onnx_model = write_decoder(model, last_position_logits) if write else None
    if onnx_model is not None:
        onnx_model.meta["edgec.trace"] = "every layer, written"
        return onnx_model
    onnx_model = _trace(model, last_position_logits)
    onnx_model.meta["edgec.trace"] = "every layer"
    return onnx_model


def writes_layer(write_layer: bool | None = None) -> bool:
    """Whether the decoder's graph (one layer to stamp, or every layer) is written (layer_graph.py) where it can
    be: EDGEC_WRITE_LAYER=0 traces it, as edgec did before, to compare or to work around a difference."""
    if write_layer is not None:
        return write_layer
    return os.environ.get("EDGEC_WRITE_LAYER", "1").strip().lower() not in ("0", "off", "no", "false")


def trace_options(last_position_logits: bool) -> dict:
    """The export options that change the one-layer trace (part of its cache key)."""
    return {"last_position_logits": last_position_logits}


def _template_trace(view: CanonicalDecoder, last_position_logits: bool, cache_dir: Path | None,
                    ahead: TraceAhead | None) -> ir.Model:
    from compiler.onnx import trace_cache

    key = trace_cache.trace_key(view, trace_options(last_position_logits)) if cache_dir else None
    how = "cached"
    if ahead is not None:
        if ahead.key == key and ahead.wait():
            how = "one layer, traced ahead"
        else:
            ahead.close()
    onnx_model = trace_cache.load(cache_dir, key, view) if key else None
    if onnx_model is not None:
        onnx_model.meta["edgec.trace"] = how
        return onnx_model
    onnx_model = _trace(view, last_position_logits)
    if key:
        trace_cache.store(cache_dir, key, onnx_model, view)
    onnx_model.meta["edgec.trace"] = "one layer"
    return onnx_model


def trace_into_cache(view: CanonicalDecoder, last_position_logits: bool, cache_dir: Path, key: str) -> bool:
    """Trace the one-layer view and store it under `key` (its trace_cache key); False when the trace cannot
    be stored."""
    from compiler.onnx import trace_cache

    return trace_cache.store(cache_dir, key, _trace(view, last_position_logits), view)


def _trace(model: CanonicalDecoder, last_position_logits: bool = False) -> ir.Model:
    # The exporter logs a warning per missing optional library (torchvision); not the user's concern.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    io = io_for(model)
    batch = torch.export.Dim(BATCH)
    seq = torch.export.Dim(SEQUENCE)
    past = torch.export.Dim(PAST)
    n_cache = 2 * model.cfg.num_layers
    # The mask length equals past + seq; DYNAMIC lets torch.export derive that relation itself.
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: torch.export.Dim.DYNAMIC},
        {0: batch, 1: seq},
        tuple({0: batch, 2: past} for _ in range(n_cache)),
    )
    # A layer without rope (SmolLM3) rotates by angle 0, exactly nothing, so that it fuses to
    # GroupQueryAttention as the others do and every layer's cache can be one shared buffer.
    model.none_rope_as_identity = True
    model.last_position_logits = last_position_logits
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                _example_inputs(model),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=io.input_names,
                output_names=io.output_names,
                optimize=True,
                verbose=False,
                report=False,
            )
    finally:
        del model.none_rope_as_identity  # the reference keeps skipping rotation
        del model.last_position_logits  # and computes every position
    onnx_model = program.model
    _name_dims(onnx_model)
    onnx_model.producer_name = "edgec"
    return onnx_model


# The exporter's per-node Python stack traces name edgec's absolute install path and source line numbers:
# kept, they would make a build's bytes depend on where edgec is installed and on unrelated source edits.
STACK_TRACE = "pkg.torch.onnx.stack_trace"


def save_onnx(model: ir.Model, path: Path) -> list[Path]:
    """Write model.onnx with its weights in one external data file beside it; returns both paths."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.pop(STACK_TRACE, None)
    data_name = path.name + ".data"
    ir.save(model, str(path), external_data=data_name)
    return [path, path.with_name(data_name)]
