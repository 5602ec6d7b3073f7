"""The canonical decoder against transformers' own models, per family, through the real loading code."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from compiler.frontend.load import build_decoder, read_checkpoint
from tests.conftest import MODEL_VARIANTS


def canonical_logits(model, ids, past_len=0, cache=None):
    batch, seq = ids.shape
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq)[None].expand(batch, seq)
    with torch.no_grad():
        return model(ids, mask, positions, *(cache or model.empty_cache(batch)))


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_canonical_decoder_matches_transformers(model_dir, variant):
    directory = model_dir(variant)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model = build_decoder(read_checkpoint(directory))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    logits = canonical_logits(model, ids)[0]
    assert (logits - expected).abs().max().item() <= 1e-4
    # The same logits when the prompt arrives in two steps over the KV cache.
    first, *cache = canonical_logits(model, ids[:, :6])
    second = canonical_logits(model, ids[:, 6:], past_len=6, cache=cache)[0]
    assert (second - expected[:, 6:]).abs().max().item() <= 1e-4


def test_family_details_are_read(model_dir):
    llama3 = read_checkpoint(model_dir("llama3_tied")).config
    assert llama3.rope_type == "llama3" and llama3.tie_word_embeddings
    assert read_checkpoint(model_dir("qwen2")).config.qkv_bias
    phi3 = read_checkpoint(model_dir("phi3_partial_rotary")).config
    assert phi3.rotary_dim == phi3.head_dim // 2


def test_longrope_is_capped_at_its_original_context(model_dir):
    """Past the original context transformers switches to the long-factor table for every position; edgec
    builds the short table and caps the context there (the build warns), so it is never silently wrong."""
    cfg = read_checkpoint(model_dir("phi4_longrope")).config
    assert cfg.rope_type == "longrope" and cfg.max_sequence_length == 64 and cfg.rotary_dim == 12
    assert cfg.rope_attention_scaling > 1.0  # longrope's attention factor, applied to cos and sin


def test_sharded_checkpoint_loads(llama_dir, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(llama_dir, sharded)
    state = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n].contiguous() for n in part}, sharded / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a = build_decoder(read_checkpoint(llama_dir))
    b = build_decoder(read_checkpoint(sharded))
    ids = torch.tensor([[1, 5, 9, 200]])
    assert torch.equal(canonical_logits(a, ids)[0], canonical_logits(b, ids)[0])


def test_source_hashes_made_in_the_background_equal_the_files_sha256(llama_dir, tmp_path):
    """The build hashes the source files in a thread from read_model_files on: the same digests, every
    source file (config, weights, tokenizer, generation config) and no other."""
    import hashlib

    from compiler.frontend.load import read_model_files

    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    (model / "notes.txt").write_text("not a source file")
    files = read_model_files(model, hash_sources=True)
    hashes = read_checkpoint(model, files=files).source_hashes()
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.iterdir() if p.name != "notes.txt"}
    assert hashes == expected and "tokenizer.json" in hashes
    assert hashes == read_checkpoint(model).source_hashes()  # computed in the caller's thread


def test_a_weight_files_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import hashlib
    import os
    import time

    from compiler.frontend import load

    monkeypatch.setenv("EDGEC_HASH_CACHE", str(tmp_path / "hashes"))
    weights, small = tmp_path / "model.safetensors", tmp_path / "config.json"
    weights.write_bytes(os.urandom(load.REMEMBERED_HASH_MIN_BYTES))
    small.write_text("{}")
    reads = []
    hash_file = load.sha256_file
    monkeypatch.setattr(load, "sha256_file", lambda path: reads.append(path.name) or hash_file(path))
    first = load.hash_files([weights, small])
    assert first == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (weights, small)}
    assert len(list((tmp_path / "hashes").iterdir())) == 1  # small files are hashed each time
    assert load.hash_files([weights, small]) == first and reads == ["model.safetensors", "config.json", "config.json"]
    # Rewritten in place, same size, its modification time set back: the change time still tells.
    stat = weights.stat()
    time.sleep(0.05)
    with open(weights, "r+b") as f:
        f.write(b"changed")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load.remembered_sha256(weights) == hashlib.sha256(weights.read_bytes()).hexdigest() != first[weights.name]
    monkeypatch.setenv("EDGEC_HASH_CACHE", "0")
    reads.clear()
    load.remembered_sha256(weights)
    assert reads == ["model.safetensors"]


def test_bf16_checkpoint_is_upcast(llama_dir, tmp_path):
    bf16 = tmp_path / "bf16"
    shutil.copytree(llama_dir, bf16)
    state = load_file(bf16 / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, bf16 / "model.safetensors", metadata={"format": "pt"})
    model = build_decoder(read_checkpoint(bf16))
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"].to(torch.bfloat16).float())


# SmolLM2-135M-Instruct's config.json as transformers 4 wrote it on the hub (rope_theta and rope_scaling; no
# head_dim), beside the tiny models' transformers 5 files (rope_parameters).
SMOLLM2_HUB_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
    "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
    "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152,
}


# Qwen2.5-0.5B-Instruct's, as the hub has it (transformers 4's form, no pad_token_id).
QWEN25_HUB_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
HUB_CONFIGS = {"smollm2-hub": SMOLLM2_HUB_CONFIG, "qwen25-hub": QWEN25_HUB_CONFIG}


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2", "qwen3", *HUB_CONFIGS])
def test_a_plain_config_is_read_as_transformers_reads_it(variant, model_dir, tmp_path):
    """compiler/frontend/plain_config.py: the same DecoderConfig as through AutoConfig, without transformers."""
    from transformers import AutoConfig

    from compiler.frontend.plain_config import plain_config
    from compiler.models.families import decoder_config

    if variant in HUB_CONFIGS:
        directory = tmp_path
        (directory / "config.json").write_text(json.dumps(HUB_CONFIGS[variant]))
    else:
        directory = model_dir(variant)
    raw = json.loads((directory / "config.json").read_text())
    family = raw["model_type"]
    plain = plain_config(raw, family)
    assert plain is not None
    assert decoder_config(plain, family, "x") == decoder_config(AutoConfig.from_pretrained(directory), family, "x")


@pytest.mark.parametrize("variant", ["llama3_tied", "phi3", "smollm3", "gemma3"])
def test_other_configs_are_read_through_transformers(variant, model_dir):
    from compiler.frontend.plain_config import plain_config

    raw = json.loads((model_dir(variant) / "config.json").read_text())
    assert plain_config(raw, raw["model_type"]) is None  # scaled rope, or a family whose class derives values
    llama = json.loads((model_dir("llama") / "config.json").read_text())
    assert plain_config(llama, "llama") is not None
    without_pad = {k: v for k, v in llama.items() if k != "pad_token_id"}  # as Qwen2.5's, say: None in every class
    assert plain_config(without_pad, "llama").pad_token_id is None
    missing = dict(llama)
    del missing["bos_token_id"]  # LlamaConfig's default (1) is not every family's
    # AutoConfig picks MistralConfig by model_type (its window 4096) whatever the architecture says; it
    # refuses a string size, an integer eps, an unscaled rope without a base.
    for other in (missing, {**llama, "model_type": "mistral"}, {**llama, "hidden_size": "64"},
                  {**llama, "rms_norm_eps": 1}, {**llama, "rope_parameters": {"rope_type": "default", "rope_theta": None}},
                  {**llama, "num_attention_heads": 3}):
        assert plain_config(other, "llama") is None, other


def test_reading_a_plain_model_does_not_import_transformers(llama_dir):
    import subprocess
    import sys

    script = ("import sys; from compiler.frontend.load import read_model_files; "
              f"files = read_model_files({str(llama_dir)!r}); "
              "print(files.config.num_layers, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    assert out == [str(read_checkpoint(llama_dir).config.num_layers), "False"]
