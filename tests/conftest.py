"""Tiny models and adapters written by transformers' and PEFT's own save_pretrained, loaded through edgec."""

from __future__ import annotations

import os

import pytest

from compiler.tiny_models import make_adapter, make_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Float results are asked to be bit-equal only where edgec itself makes them so on any CPU: two builds on
# one machine (same inputs, same library versions) give byte-identical files. Across CPUs (Intel or AMD,
# AVX-512 or AVX2, x86-64 or ARM64), MKL, onnxruntime and torch's own kernels pick other code paths and
# reduction orders, and so may a different schedule of the same work (row jobs, batches, windows, threads)
# on one CPU: there, tests compare within tolerances (int4 codes equal but for rounding ties, scales to a
# relative 1e-5). The suite passes with the dispatch forced down as well:
#     ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2 MKL_CBWR=AVX2 make test

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# Phi-4-mini's rope: partial rotary (0.75), longrope with short and long factor tables switched at the
# original context.
PHI4_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                 "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0], "original_max_position_embeddings": 64}

# name -> (family, config overrides): each family, tied and untied, the rope and bias variants.
MODEL_VARIANTS = {
    "llama": ("llama", dict(tie_word_embeddings=False)),
    "llama3_tied": ("llama", dict(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(tie_word_embeddings=True)),
    "phi3": ("phi3", dict(tie_word_embeddings=False)),
    "phi3_partial_rotary": ("phi3", dict(partial_rotary_factor=0.5)),
    "phi4_longrope": ("phi3", dict(partial_rotary_factor=0.75, rope_scaling=PHI4_LONGROPE, original_max_position_embeddings=64,
                                   tie_word_embeddings=True)),
    "mistral": ("mistral", dict(tie_word_embeddings=False)),
    # No rope on every 2nd layer (layer 1 of 2).
    "smollm3": ("smollm3", dict(no_rope_layer_interval=2)),
    # A sliding (local rope, base 10000) then a global layer (base 1e6, linear scaling), window 64.
    "gemma3": ("gemma3_text", dict(sliding_window_pattern=2, sliding_window=64,
                                   rope_scaling={"rope_type": "linear", "factor": 4.0})),
}


@pytest.fixture(scope="session", autouse=True)
def trace_cache(tmp_path_factory):
    """Builds keep their one-layer ONNX traces in this session's own directory, not the user's cache: tests
    share them as builds on one machine would (edgec processes started by tests inherit the setting)."""
    directory = tmp_path_factory.mktemp("onnx-traces")
    # Nor do they trace in a child process on a machine with a spare CPU (trace_ahead.py): what a test
    # asserts of a build's trace stays the same on any machine; test_trace_cache starts children itself.
    settings = {"EDGEC_TRACE_CACHE": str(directory), "EDGEC_TRACE_AHEAD": "0"}
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield directory
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(name) -> path of a saved tiny model of that variant (made once per session)."""
    made = {}

    def get(name: str):
        if name not in made:
            family, overrides = MODEL_VARIANTS[name]
            path = tmp_path_factory.mktemp(f"model-{name}")
            make_model(path, family, **overrides)
            made[name] = path
        return made[name]

    return get


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    """A small Llama fitted briefly to the demo text, so quantization error meets real logit margins."""
    path = tmp_path_factory.mktemp("model-trained")
    make_model(path, "llama", train_steps=150, tie_word_embeddings=True, hidden_size=128, intermediate_size=256,
               num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    return path


@pytest.fixture(scope="session")
def llama_dir(model_dir):
    return model_dir("llama")


@pytest.fixture(scope="session")
def llama_adapter(llama_dir, tmp_path_factory):
    return make_adapter(llama_dir, tmp_path_factory.mktemp("adapter") / "lora",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="session")
def tiny_bundle(llama_dir, tmp_path_factory):
    """The smallest bundle (2-layer Llama, no adapter, unvalidated): for device and report tests."""
    from click.testing import CliRunner

    from compiler.cli import main

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    result = CliRunner().invoke(main, ["build", "--model", str(llama_dir), "--out", str(out), "--quiet", "--no-validate"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def validated_bundle(llama_dir, tmp_path_factory):
    """The 2-layer Llama bundle, validated: it carries golden.npz (the phone's self-test and device
    validation compare with it)."""
    from click.testing import CliRunner

    from compiler.cli import main

    out = tmp_path_factory.mktemp("validated") / "bundle"
    result = CliRunner().invoke(main, ["build", "--model", str(llama_dir), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out
