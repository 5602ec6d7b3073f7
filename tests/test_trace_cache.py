"""The one-layer ONNX trace kept between builds (compiler/onnx/trace_cache.py): a build that loads it writes
the bytes a build that traces writes, with its own weights bound in."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from compiler.frontend.load import build_decoder, read_checkpoint
from compiler.onnx import trace_ahead, trace_cache
from compiler.onnx.export import export_onnx, one_layer_view, save_onnx
from compiler.tiny_models import make_model


@pytest.fixture(autouse=True)
def traced_layers(monkeypatch):
    """These tests are of the trace: the export and the child trace the layer that layer_graph.py would write."""
    monkeypatch.setenv("EDGEC_WRITE_LAYER", "0")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two tied Llamas of one configuration, different weights (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("same-architecture")
    for seed in (0, 1):
        make_model(root / f"seed{seed}", "llama", seed=seed, tie_word_embeddings=True)
    return root / "seed0", root / "seed1"


def bundle_digest(model: ir.Model, directory) -> str:
    directory.mkdir()
    paths = save_onnx(model, directory / "model.onnx")
    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()


def test_a_cached_trace_with_the_next_models_weights_is_what_tracing_that_model_gives(two_models, tmp_path):
    first, second = two_models
    cache = tmp_path / "traces"
    stored = export_onnx(build_decoder(read_checkpoint(first)), last_position_logits=True, trace_cache=cache)
    assert stored.meta["edgec.trace"] == "one layer" and len(list(cache.glob("*.onnx"))) == 1
    # The entry holds the graph, not the weights: its parameters are references to be bound at load.
    entry = onnx.load(str(next(cache.glob("*.onnx"))), load_external_data=False)
    assert sum(len(t.raw_data) + 4 * len(t.float_data) for t in entry.graph.initializer) < 1024

    cached = export_onnx(build_decoder(read_checkpoint(second)), last_position_logits=True, trace_cache=cache)
    traced = export_onnx(build_decoder(read_checkpoint(second)), last_position_logits=True)
    assert cached.meta["edgec.trace"] == "cached" and traced.meta["edgec.trace"] == "one layer"
    assert bundle_digest(cached, tmp_path / "cached") == bundle_digest(traced, tmp_path / "traced")
    assert bundle_digest(stored, tmp_path / "first") != bundle_digest(traced, tmp_path / "second")


def test_a_trace_made_ahead_in_a_child_process_is_what_the_export_traces_itself(two_models, tmp_path,
                                                                               monkeypatch):
    """The child traces a random-weight view of the configuration before the weights are read; the export
    binds the model's own weights into it and writes the bytes it writes when it traces."""
    monkeypatch.setenv("EDGEC_TRACE_AHEAD", "1")  # also where no CPU is spare
    cache = tmp_path / "traces"
    decoder = build_decoder(read_checkpoint(two_models[1]))
    ahead = trace_ahead.start(decoder.cfg, {"last_position_logits": True}, cache, memory_headroom_mb=None)
    assert ahead is not None
    made_ahead = export_onnx(decoder, last_position_logits=True, trace_cache=cache, ahead=ahead)
    assert made_ahead.meta["edgec.trace"] == "one layer, traced ahead"
    assert ahead.peak_rss_mb > 100 and len(list(cache.glob("*.onnx"))) == 1
    traced = export_onnx(decoder, last_position_logits=True)
    assert bundle_digest(made_ahead, tmp_path / "ahead") == bundle_digest(traced, tmp_path / "traced")
    # Stored now: a second build has nothing to start.
    assert trace_ahead.start(decoder.cfg, {"last_position_logits": True}, cache, None) is None


def test_a_child_tracing_other_options_is_stopped_and_the_export_traces(two_models, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEC_TRACE_AHEAD", "1")
    decoder = build_decoder(read_checkpoint(two_models[0]))
    ahead = trace_ahead.start(decoder.cfg, {"last_position_logits": False}, tmp_path, None)
    model = export_onnx(decoder, last_position_logits=True, trace_cache=tmp_path, ahead=ahead)
    assert model.meta["edgec.trace"] == "one layer" and ahead.process.returncode is not None
    assert not ahead._config_file.exists() and not ahead._log_file.exists()


def test_a_child_starts_only_with_a_spare_cpu_and_a_view_that_fits_the_budget(two_models, tmp_path,
                                                                              monkeypatch):
    import os

    import torch

    cfg = build_decoder(read_checkpoint(two_models[0])).cfg
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("EDGEC_TRACE_AHEAD", "auto")
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        assert trace_ahead.start(cfg, {"last_position_logits": True}, tmp_path, None) is None
        monkeypatch.setenv("EDGEC_TRACE_AHEAD", "1")
        assert trace_ahead.start(cfg, {"last_position_logits": True}, tmp_path, memory_headroom_mb=100) is None
        monkeypatch.setenv("EDGEC_TRACE_AHEAD", "0")
        assert trace_ahead.start(cfg, {"last_position_logits": True}, tmp_path, None) is None
        if trace_ahead.usable_cpus() >= 2:  # affinity and any cgroup CPU quota
            monkeypatch.setenv("EDGEC_TRACE_AHEAD", "auto")
            torch.set_num_threads(1)
            ahead = trace_ahead.start(cfg, {"last_position_logits": True}, tmp_path, None)
            assert ahead is not None
            ahead.close()
    finally:
        torch.set_num_threads(threads)
    assert not list(tmp_path.glob("*.onnx"))


def test_the_key_follows_the_options_and_the_configuration(two_models):
    view = one_layer_view(build_decoder(read_checkpoint(two_models[0])))
    key = trace_cache.trace_key(view, {"last_position_logits": True})
    assert key == trace_cache.trace_key(view, {"last_position_logits": True})
    assert key != trace_cache.trace_key(view, {"last_position_logits": False})
    view.cfg = view.cfg.__class__(**{**view.cfg.__dict__, "rms_norm_eps": view.cfg.rms_norm_eps * 2})
    assert key != trace_cache.trace_key(view, {"last_position_logits": True})


def test_a_graph_holding_a_constant_made_from_a_weight_is_not_stored(two_models, tmp_path):
    """A folded constant (here a norm weight doubled) cannot be told from the weights it came from, so the
    graph is traced every time rather than stored with the first model's numbers in it."""
    from compiler.onnx.export import _trace

    view = one_layer_view(build_decoder(read_checkpoint(two_models[0])))
    model = _trace(view, True)
    norm = model.graph.initializers["model.norm.weight"]
    norm.const_value = ir.tensor(norm.const_value.numpy() * 2, name=norm.name)
    assert not trace_cache.store(tmp_path, "k", model, view)
    assert not list(tmp_path.iterdir())


def test_a_trace_of_parameters_holding_equal_data_is_not_stored(two_models, tmp_path):
    """An untrained model's norms are all ones, and the exporter merges equal small initializers into one:
    stored, that graph would give the next model's different norms one shared tensor."""
    import torch

    untrained, trained = (build_decoder(read_checkpoint(path)) for path in two_models)
    with torch.no_grad():
        for (name, param), other in zip(untrained.named_parameters(), trained.parameters()):
            if "norm" in name:
                param.fill_(1.0)
                other.normal_(1.0, 0.1)
    cache = tmp_path / "traces"
    export_onnx(untrained, trace_cache=cache)
    assert not list(cache.glob("*.onnx"))
    cached = export_onnx(trained, trace_cache=cache)
    assert cached.meta["edgec.trace"] == "one layer"
    assert bundle_digest(cached, tmp_path / "cached") == bundle_digest(export_onnx(trained), tmp_path / "traced")


def test_a_damaged_entry_is_traced_again_and_replaced(two_models, tmp_path):
    decoder = build_decoder(read_checkpoint(two_models[0]))
    key = trace_cache.trace_key(one_layer_view(decoder), {"last_position_logits": False})
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / f"{key}.onnx").write_bytes(b"not an onnx model")
    model = export_onnx(decoder, trace_cache=tmp_path)
    assert model.meta["edgec.trace"] == "one layer"
    again = trace_cache.load(tmp_path, key, one_layer_view(decoder))
    assert again is not None
    bound = {name: v.const_value.numpy() for name, v in again.graph.initializers.items()}
    table = decoder.model.embed_tokens.weight.detach().numpy()
    assert any(a.shape == table.shape and np.array_equal(a, table) for a in bound.values()), list(bound)


def test_a_cache_directory_that_cannot_be_written_only_costs_the_trace(two_models, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    model = export_onnx(build_decoder(read_checkpoint(two_models[0])), trace_cache=blocked / "traces")
    assert model.meta["edgec.trace"] == "one layer" and blocked.read_text() == "not a directory"


def test_an_unnamed_constant_is_taken_for_a_parameter_only_when_that_is_unambiguous():
    """Tied names of one tensor are one parameter; two tensors holding equal data are not told apart."""
    import torch

    weight = torch.randn(8, 4)
    graph = ir.Graph([], [], nodes=[])
    graph.register_initializer(ir.Value(name="val_1", const_value=ir.tensor(weight.numpy().T.copy())))
    model = ir.Model(graph, ir_version=10)

    class View:
        class cfg:
            rope_inv_freq = local_rope_inv_freq = ()

    tied = {"model.embed_tokens.weight": weight, "lm_head.weight": weight}
    assert trace_cache._parameter_sources(model, View, tied) == {"val_1": ("model.embed_tokens.weight", True)}
    assert trace_cache._parameter_sources(model, View, {"a.weight": weight, "b.weight": weight.clone()}) is None
