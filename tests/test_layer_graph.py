"""The one-layer graph written without tracing (compiler/onnx/layer_graph.py) is the graph the dynamo exporter
traces: node for node, with the same ops, attributes, constants, value types and shapes, module scopes and
wiring, over every configuration it accepts; the bundles built from either are the same."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from compiler.cli import main
from compiler.frontend.load import build_decoder, read_checkpoint
from compiler.onnx.export import _trace, export_onnx, one_layer_view, save_onnx
from compiler.onnx.layer_graph import write_one_layer
from compiler.onnx.scopes import scopes
from compiler.tiny_models import make_model

# The exporter's graph-wide size names; any other symbol (its own, say for the mask's length) is compared
# as "some symbol".
SIZE_NAMES = {"batch_size", "sequence_length", "past_sequence_length", "total_sequence_length",
              "past_sequence_length + sequence_length"}


def _shape(value: ir.Value):
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else d.value if d.value in SIZE_NAMES else "symbol" for d in value.shape)


def canonical(model: ir.Model):
    """The graph with names left out: inputs, outputs and each node in order (op, attributes, module path,
    where each input comes from: a graph input, an earlier node's output or a constant by its bytes, and
    the output types and shapes)."""
    graph = model.graph
    origin: dict[ir.Value, tuple] = {v: ("input", v.name) for v in graph.inputs}

    def source(value):
        if value is None:
            return None
        if value in origin:
            return origin[value]
        if value.const_value is not None:
            array = np.ascontiguousarray(value.const_value.numpy())
            return "constant", array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest()
        return "unknown", value.name

    nodes = []
    for index, node in enumerate(graph):
        attributes = tuple(sorted((a.name, repr(a.value)) for a in node.attributes.values()))
        nodes.append((node.domain, node.op_type, attributes, tuple(scopes(node)[:-1]),
                      tuple(source(v) for v in node.inputs), tuple((o.dtype, _shape(o)) for o in node.outputs)))
        origin.update({output: ("node", index, k) for k, output in enumerate(node.outputs)})
    inputs = [(v.name, v.dtype, _shape(v)) for v in graph.inputs]
    outputs = [(v.name, v.dtype, _shape(v), source(v)) for v in graph.outputs]
    return inputs, outputs, nodes


def first_difference(written: ir.Model, traced: ir.Model):
    a, b = canonical(written), canonical(traced)
    for part, x, y in zip(("inputs", "outputs"), a[:2], b[:2]):
        if x != y:
            return part, x, y
    for index, (x, y) in enumerate(zip(a[2], b[2])):
        if x != y:
            return index, x, y
    return None if len(a[2]) == len(b[2]) else ("node count", len(a[2]), len(b[2]))


@pytest.fixture(scope="module")
def biased_grouped_llama(tmp_path_factory):
    """Every bias (q/k/v, o, MLP) and one query head per KV head."""
    path = tmp_path_factory.mktemp("biased-llama")
    make_model(path, "llama", attention_bias=True, mlp_bias=True, num_key_value_heads=4, tokenizer=False)
    return path


# (model variant, logits of the last position only): tied and untied heads, llama3 rope, Qwen2's q/k/v
# biases, Qwen3's per-head q/k norms, Phi-3's fused projections (split on load), every bias with groups of one.
CASES = [("llama", False), ("llama3_tied", True), ("qwen2", True), ("qwen3", False), ("phi3", True),
         ("biased", True)]


@pytest.mark.parametrize("variant, last_position_logits", CASES)
def test_the_written_graph_is_the_traced_graph(variant, last_position_logits, model_dir, biased_grouped_llama):
    directory = biased_grouped_llama if variant == "biased" else model_dir(variant)
    view = one_layer_view(build_decoder(read_checkpoint(directory)))
    written = write_one_layer(view, last_position_logits)
    assert written is not None
    assert first_difference(written, _trace(view, last_position_logits)) is None


@pytest.mark.parametrize("variant, why", [("phi3_partial_rotary", "partial rotary"),
                                          ("gemma3", "Gemma-style norms, activation or embedding scale"),
                                          ("phi4_longrope", "partial rotary")])
def test_other_configurations_are_traced(variant, why, model_dir):
    from compiler.onnx.layer_graph import unsupported

    decoder = build_decoder(read_checkpoint(model_dir(variant)))
    if len(set(decoder.cfg.layer_rope)) <= 1:
        assert unsupported(one_layer_view(decoder).cfg) == why
        assert write_one_layer(one_layer_view(decoder), True) is None
    else:  # Gemma 3's local and global layers: every layer is traced
        assert unsupported(one_layer_view(decoder).cfg) is not None
    assert export_onnx(decoder, last_position_logits=True).meta["edgec.trace"] in ("one layer", "cached",
                                                                                   "every layer")


def test_the_stamped_model_is_the_stamped_trace_with_the_same_weights(model_dir, tmp_path):
    decoder = build_decoder(read_checkpoint(model_dir("llama3_tied")))
    written = export_onnx(decoder, last_position_logits=True, write_layer=True)
    traced = export_onnx(decoder, last_position_logits=True, write_layer=False)
    assert written.meta["edgec.trace"] == "one layer, written"
    assert traced.meta["edgec.trace"] in ("one layer", "cached")
    assert first_difference(written, traced) is None
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
    assert first_difference(models["written"][1], models["traced"][1]) is None
    assert ((tmp_path / "written" / "model.onnx.data").read_bytes()
            == (tmp_path / "traced" / "model.onnx.data").read_bytes())
