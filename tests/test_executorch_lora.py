"""Runtime LoRA in a .pte: one program and foundation .ptd, one .ptd per adapter, run in ExecuTorch's runtime
against the canonical decoder with that adapter merged by the real merge path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compiler.frontend.load import build_decoder, read_checkpoint
from compiler.frontend.lora import AdapterSpec, merge_lora, read_lora_pairs
from compiler.tiny_models import make_adapter

pytest.importorskip("executorch")

MAX_SEQ_LEN = 24
IDS = np.asarray([[3, 17, 9, 40, 22, 7]])


def _pairs(base, adapter_dir):
    return read_lora_pairs(read_checkpoint(base), AdapterSpec(adapter_dir))


def _export(base, slots, out):
    from compiler.executorch.export import ExecutorchDecoder, runner_metadata
    from compiler.executorch.lora import export_pte_with_lora

    model = build_decoder(read_checkpoint(base))
    metadata = runner_metadata(model.cfg, MAX_SEQ_LEN, model.cfg.bos_token_id, list(model.cfg.eos_token_ids))
    return export_pte_with_lora(ExecutorchDecoder(model, MAX_SEQ_LEN), slots, metadata, out)


@pytest.fixture(scope="module")
def lora_bundle(llama_dir, tmp_path_factory):
    """Two unlike adapters (ranks 4 and 8, other targets; b on k only of q/k/v) in one program."""
    from compiler.executorch.lora import slots_for, write_adapter_ptd

    root = tmp_path_factory.mktemp("pte-lora")
    adapters = {
        "a": make_adapter(llama_dir, root / "a", target_modules=["q_proj", "v_proj", "down_proj"], r=4, alpha=8),
        "b": make_adapter(llama_dir, root / "b", target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"], r=8,
                          alpha=4, seed=2),
    }
    pairs = {name: _pairs(llama_dir, path) for name, path in adapters.items()}
    out = root / "bundle"
    exported = _export(llama_dir, slots_for(list(pairs.values())), out)
    files = {name: f"adapters/{name}.ptd" for name in (*pairs, "none")}
    for name, path in files.items():
        write_adapter_ptd(out / path, exported.slots, pairs.get(name, {}))
    (out / "manifest.json").write_text(json.dumps({"artifacts": [{
        "format": "pte", "path": "model.pte", "data_files": ["model.ptd"],
        "adapters": {name: files[name] for name in pairs}, "base_adapter": files["none"]}]}))
    return out, adapters, exported


def _reference(base, adapter_dirs):
    """Every position's logits of the canonical decoder with these adapters merged (fp32)."""
    checkpoint = read_checkpoint(base)
    merge_lora(checkpoint, [AdapterSpec(d) for d in adapter_dirs])
    model = build_decoder(checkpoint)
    ids = torch.from_numpy(IDS)
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], *model.empty_cache(1))[0]
    return logits[0].numpy()


@pytest.mark.parametrize("adapter", ["a", "b", None])
def test_each_adapter_file_gives_that_adapter_merged(lora_bundle, llama_dir, adapter):
    from runtimes.executorch import ExecutorchRuntime

    out, adapters, _ = lora_bundle
    runtime = ExecutorchRuntime(out, adapter=adapter)
    assert [p.name for p in runtime.data_files] == ["model.ptd", f"{adapter or 'none'}.ptd"]
    expected = _reference(llama_dir, [adapters[adapter]] if adapter else [])
    # The prefill's last position (the runner's path) and single steps on the cache (the decode path).
    logits, _ = runtime.forward(IDS, runtime.empty_cache(), 0)
    np.testing.assert_allclose(logits[0], expected, atol=1e-4, rtol=0)
    if adapter:
        assert np.abs(expected - _reference(llama_dir, [])).max() > 1e-2, "the adapter must change the output"


def test_the_foundation_does_not_depend_on_the_adapters(lora_bundle, llama_dir, tmp_path):
    out, adapters, exported = lora_bundle
    only_b = _export(llama_dir, _slots_of(llama_dir, adapters["b"]), tmp_path)
    assert (tmp_path / "model.ptd").read_bytes() == (out / "model.ptd").read_bytes()
    assert exported.foundation_bytes > 4 * (out / "adapters" / "a.ptd").stat().st_size
    assert exported.pte_bytes < exported.foundation_bytes / 4  # the weights are in the foundation
    # Ranks are padded to the slots': k (rank 8, from b) and q, v (rank 4, from a) share one packed branch.
    layer0 = "model.layers.0.self_attn"
    assert [exported.slots[f"{layer0}.{p}_proj"][2] for p in "qkv"] == [4, 8, 4]
    assert only_b.slots[f"{layer0}.q_proj"][2] == 0


def _slots_of(base, adapter_dir):
    from compiler.executorch.lora import slots_for

    return slots_for([_pairs(base, adapter_dir)])


def test_an_adapter_that_does_not_fit_the_slots_is_refused(lora_bundle, llama_dir, tmp_path):
    from compiler.errors import UsageError
    from compiler.executorch.lora import write_adapter_ptd

    _, adapters, exported = lora_bundle
    a = _pairs(llama_dir, adapters["a"])
    bigger = {k: (torch.cat([v[0], v[0]]), torch.cat([v[1], v[1]], dim=1)) for k, v in a.items()}
    with pytest.raises(UsageError, match="do not fit its slot"):
        write_adapter_ptd(tmp_path / "x.ptd", exported.slots, bigger)
    with pytest.raises(UsageError, match="has no LoRA slot"):
        write_adapter_ptd(tmp_path / "x.ptd", exported.slots, {"lm_head": a["model.layers.0.self_attn.q_proj"]})
