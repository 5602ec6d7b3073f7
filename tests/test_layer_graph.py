"""The one-layer graph written without tracing (compiler/onnx/layer_graph.py) is the graph the dynamo exporter
traces: node for node, with the same ops, attributes, constants, value types and shapes, module scopes and
wiring, over every configuration it accepts; the bundles built from either are the same."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner

from compiler.cli import main
from compiler.frontend.load import build_decoder, read_checkpoint
from compiler.onnx.export import _trace, export_onnx, one_layer_view, save_onnx
from compiler.onnx.layer_graph import BATCH, PAST, PAST_PLUS_SEQ, SEQUENCE, TOTAL, write_decoder
from compiler.onnx.scopes import scopes
from compiler.tiny_models import make_model

# The exporter's graph-wide size names; any other symbol (its own, say for the mask's length) is compared
# as "some symbol".
SIZE_NAMES = {BATCH, SEQUENCE, PAST, TOTAL, PAST_PLUS_SEQ}


def _shape(value: ir.Value):
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else d.value if d.value in SIZE_NAMES else "symbol" for d in value.shape)


def structure(model: ir.Model) -> tuple[list, list]:
    """Each value as a digest of how it is computed, names left out: a node output's digest covers its op,
    attributes, module path, output type and shape and its inputs' digests; a constant's, its bytes; a
    graph input's, its name. A Shape of a graph input is the sizes it reads (the exporter takes the batch
    or past length from whichever input it bound the symbol to first). Returns the graph outputs' (name,
    digest) and the sorted digests of every node output."""
    digests: dict[ir.Value, str] = {}

    def digest(value) -> str:
        if value is None:
            return "absent"
        if value not in digests:  # a graph input or a constant
            if value.const_value is not None:
                array = np.ascontiguousarray(value.const_value.numpy())
                described = ("constant", array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
            else:
                described = ("input", value.name, value.dtype, _shape(value))
            digests[value] = hashlib.sha256(repr(described).encode()).hexdigest()
        return digests[value]

    for node in model.graph:  # in topological order
        attributes = tuple(sorted((a.name, repr(a.value)) for a in node.attributes.values()))
        source = node.inputs[0] if node.inputs else None
        if node.op_type == "Shape" and source is not None and source.producer() is None and source.const_value is None:
            start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(source.shape))
            inputs = ("sizes", _shape(source)[start:end])
        else:
            inputs = tuple(digest(v) for v in node.inputs)
        for index, output in enumerate(node.outputs):
            described = (node.domain, node.op_type, attributes, tuple(scopes(node)[:-1]), inputs, index,
                         output.dtype, _shape(output))
            digests[output] = hashlib.sha256(repr(described).encode()).hexdigest()
    outputs = [(v.name, digest(v)) for v in model.graph.outputs]
    return outputs, sorted(digests[o] for node in model.graph for o in node.outputs)


def differences(written: ir.Model, traced: ir.Model) -> list[str]:
    """What differs between the two graphs' structures: [] when they compute alike, node for node."""
    (outputs_a, nodes_a), (outputs_b, nodes_b) = structure(written), structure(traced)
    found = [f"{what}: {a} / {b}" for what, a, b in (
        ("inputs", [(v.name, v.dtype, _shape(v)) for v in written.graph.inputs],
         [(v.name, v.dtype, _shape(v)) for v in traced.graph.inputs]),
        ("opsets", written.opset_imports, traced.opset_imports),
        ("IR version", written.ir_version, traced.ir_version),
        ("unused initializers", sum(not v.uses() for v in written.graph.initializers.values()),
         sum(not v.uses() for v in traced.graph.initializers.values()))) if a != b]
    found += [f"output {a[0]} / {b[0]}" for a, b in zip(outputs_a, outputs_b) if a != b]
    if len(outputs_a) != len(outputs_b):
        found.append(f"{len(outputs_a)} outputs against {len(outputs_b)}")
    if nodes_a != nodes_b:
        ops_a = sorted(n.op_type for n in written.graph)
        ops_b = sorted(n.op_type for n in traced.graph)
        found.append(f"{len(nodes_a)} node outputs against {len(nodes_b)}; "
                     f"ops {'equal' if ops_a == ops_b else 'differ'}")
    return found


@pytest.fixture(scope="module")
def biased_grouped_llama(tmp_path_factory):
    """Every bias (q/k/v, o, MLP) and one query head per KV head."""
    path = tmp_path_factory.mktemp("biased-llama")
    make_model(path, "llama", attention_bias=True, mlp_bias=True, num_key_value_heads=4, tokenizer=False)
    return path


# (model variant, logits of the last position only): tied and untied heads, llama3 rope, Qwen2's q/k/v
# biases, Qwen3's per-head q/k norms, Phi-3's fused projections (split on load), Phi-4-mini's partial rotary
# and scaled longrope tables, every bias with groups of one.
CASES = [("llama", False), ("llama3_tied", True), ("qwen2", True), ("qwen3", False), ("phi3", True),
         ("phi4_longrope", True), ("biased", True)]


@pytest.mark.parametrize("variant, last_position_logits", CASES)
def test_the_written_graph_is_the_traced_graph(variant, last_position_logits, model_dir, biased_grouped_llama):
    directory = biased_grouped_llama if variant == "biased" else model_dir(variant)
    view = one_layer_view(build_decoder(read_checkpoint(directory)))
    written = write_decoder(view, last_position_logits)
    assert written is not None
    traced = _trace(view, last_position_logits)
    assert differences(written, traced) == []
    assert differences(write_decoder(view, not last_position_logits), traced) != []  # (the check can fail)


@pytest.mark.parametrize("variant", ["smollm3", "gemma3"])
def test_layers_that_rotate_differently_are_written_one_by_one(variant, model_dir):
    """SmolLM3's layers without rope (angle 0) beside layers with it; Gemma 3's local and global rope tables,
    sandwich norms, GELU and scaled embeddings: no template to stamp, every layer written."""
    decoder = build_decoder(read_checkpoint(model_dir(variant)))
    assert len(set(decoder.cfg.layer_rope)) == 2
    written = export_onnx(decoder, last_position_logits=True)
    assert written.meta["edgec.trace"] == "every layer, written"
    assert differences(written, _trace(decoder, True)) == []


def test_what_is_not_written_is_traced(model_dir, monkeypatch):
    from compiler.onnx import layer_graph

    decoder = build_decoder(read_checkpoint(model_dir("llama3_tied")))
    assert layer_graph.unsupported(decoder.cfg) is None
    assert layer_graph.unsupported(dataclasses.replace(decoder.cfg, rotary_dim=7)) == "rotary_dim 7"
    assert layer_graph.unsupported(dataclasses.replace(decoder.cfg, hidden_act="relu")) == "activation relu"
    assert layer_graph.unsupported(dataclasses.replace(decoder.cfg, rope_inv_freq=(1.0,))) is not None
    assert write_decoder(decoder.to(torch.float64), True) is None  # weights that are not fp32
    decoder.to(torch.float32)
    monkeypatch.setattr(layer_graph, "unsupported", lambda cfg: "a configuration the writer does not cover")
    assert export_onnx(decoder, last_position_logits=True).meta["edgec.trace"] == "one layer"
    monkeypatch.undo()
    monkeypatch.setenv("EDGEC_WRITE_LAYER", "0")
    assert export_onnx(decoder, last_position_logits=True).meta["edgec.trace"] == "one layer"


def test_no_child_traces_ahead_for_a_graph_that_is_written(model_dir, tmp_path, monkeypatch):
    from compiler.onnx import trace_ahead

    monkeypatch.setenv("EDGEC_TRACE_AHEAD", "1")  # also where no CPU is spare
    cfg = build_decoder(read_checkpoint(model_dir("llama"))).cfg
    assert trace_ahead.start(cfg, {"last_position_logits": True}, tmp_path, None) is None
    monkeypatch.setenv("EDGEC_WRITE_LAYER", "0")
    ahead = trace_ahead.start(cfg, {"last_position_logits": True}, tmp_path, None)
    assert ahead is not None
    ahead.close()


# Every DecoderConfig field that CanonicalDecoder.forward reads is one that layer_graph.py writes (or that
# `unsupported` refuses); the others say nothing about the graph. A new field fails here until the writer
# (and this list) take it in.
WRITTEN_FIELDS = {"vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "rms_norm_eps", "tie_word_embeddings", "qkv_bias", "qk_norm", "o_bias", "mlp_bias",
                  "rotary_dim", "rope_inv_freq", "rope_attention_scaling", "layer_rope", "local_rope_inv_freq",
                  "local_rope_attention_scaling", "attention_scale", "sandwich_norms", "hidden_act", "embed_scale"}
NOT_IN_THE_GRAPH = {"family", "rope_type", "max_sequence_length", "bos_token_id", "eos_token_ids", "pad_token_id"}


def test_every_decoder_field_is_written_or_says_nothing_about_the_graph():
    from compiler.models.decoder import DecoderConfig

    assert {f.name for f in dataclasses.fields(DecoderConfig)} == WRITTEN_FIELDS | NOT_IN_THE_GRAPH


def test_the_stamped_model_is_the_stamped_trace_with_the_same_weights(model_dir, tmp_path):
    decoder = build_decoder(read_checkpoint(model_dir("llama3_tied")))
    written = export_onnx(decoder, last_position_logits=True, write_layer=True)
    traced = export_onnx(decoder, last_position_logits=True, write_layer=False)
    assert written.meta["edgec.trace"] == "one layer, written"
    assert traced.meta["edgec.trace"] in ("one layer", "cached")
    assert differences(written, traced) == []
    data = []
    for name, model in (("written", written), ("traced", traced)):
        (tmp_path / name).mkdir()
        _, data_file = save_onnx(model, tmp_path / name / "model.onnx")
        data.append(data_file.read_bytes())
    assert data[0] == data[1]


def test_an_int4_build_writes_the_bundle_a_traced_build_writes(trained_dir, tmp_path, monkeypatch):
    """Through the passes (fusions, GPTQ int4) to the files: the weights byte for byte, the graph node for node."""
    models = {}
    for name, setting in (("written", "1"), ("traced", "0")):
        monkeypatch.setenv("EDGEC_WRITE_LAYER", setting)
        result = CliRunner().invoke(main, ["build", "--model", str(trained_dir), "--out", str(tmp_path / name),
                                           "--quant", "int4", "--quiet"])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["validation"]["passed"]
        models[name] = (report["export"]["trace"], ir.load(str(tmp_path / name / "model.onnx")))
    assert models["written"][0] == "one layer, written" and models["traced"][0] in ("one layer", "cached")
    assert differences(models["written"][1], models["traced"][1]) == []
    assert ((tmp_path / "written" / "model.onnx.data").read_bytes()
            == (tmp_path / "traced" / "model.onnx.data").read_bytes())
