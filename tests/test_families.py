"""SmolLM3 (layers without rope) and Gemma 3 text (local and global rope tables, q/k norms, norms after attention
and MLP, (1 + w) norms, scaled embeddings, gelu-tanh, query_pre_attn_scalar) through both exports: the fused
ONNX model and the .pte validate against the PyTorch reference, and onnxruntime-genai runs the bundle as it is,
its greedy tokens those of transformers' own model."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from compiler.cli import main

pytest.importorskip("executorch")

VARIANTS = ["smollm3", "gemma3"]


@pytest.fixture(scope="module")
def built(model_dir, tmp_path_factory):
    """built(variant) -> (bundle dir with model.onnx and model.pte, the build's output), built once."""
    made = {}

    def get(variant):
        if variant not in made:
            out = tmp_path_factory.mktemp(f"family-{variant}") / "bundle"
            args = ["build", "--model", model_dir(variant), "--out", out, "--format", "onnx,pte", "--new-tokens", "8",
                    "--max-seq-len", "48"]
            result = CliRunner().invoke(main, [str(a) for a in args])
            assert result.exit_code == 0, result.output
            made[variant] = (out, result.output)
        return made[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_family_builds_fused_onnx_and_pte_and_passes_the_gates(built, variant):
    out, output = built(variant)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {a["format"] for a in manifest["artifacts"]} == {"onnx", "pte"}
    for artifact in manifest["artifacts"]:
        assert artifact["validation"]["passed"], artifact["format"]
        assert artifact["validation"]["metrics"]["max_abs_logits"] < 1e-4, artifact["format"]
    report = json.loads((out / "report.json").read_text())
    # Every layer fused, SmolLM3's without rope too (rotated by angle 0), so one KV buffer per layer.
    assert report["export"]["attention_by_layer"] == ["GroupQueryAttention"] * 2
    rewrites = {p["pass"]: p["rewrites"] for p in report["passes"]}
    assert rewrites["FuseRotaryEmbeddingPass"]["rotary_embedding"] == 4  # q and k of each layer
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"]
    assert "XNNPACK cannot take" not in output, output
    if variant == "gemma3":
        assert "window 64) is built as full attention" in output and genai["model"]["context_length"] == 64


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnxruntime_genai_greedy_equals_transformers(built, model_dir, variant):
    pytest.importorskip("onnxruntime_genai")
    from transformers import AutoModelForCausalLM

    from runtimes.genai import GenaiRuntime

    out, _ = built(variant)
    prompt = [1, 17, 230, 45, 99, 310, 7]
    reference = AutoModelForCausalLM.from_pretrained(model_dir(variant), dtype=torch.float32).eval()
    with torch.no_grad():
        generated = reference.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    expected = generated[0, len(prompt):].tolist()
    assert GenaiRuntime(out).generate(prompt, 32, stop_at_eos=False) == expected


def test_pte_layers_with_different_rope_are_not_stitched(tmp_path):
    """A stitched copy of layer 1 rotates as layer 1 does: a model whose layers 1 .. n-1 differ in rope (SmolLM3's
    default, no rope on every 4th layer) is lowered layer by layer instead."""
    from compiler.executorch.export import ExecutorchDecoder
    from compiler.executorch.stitch import StitchError, check_uniform_layers
    from compiler.frontend.load import build_decoder, read_checkpoint
    from compiler.tiny_models import make_model

    make_model(tmp_path / "m", "smollm3", num_hidden_layers=4, tokenizer=False)
    model = build_decoder(read_checkpoint(tmp_path / "m"))
    assert model.cfg.layer_rope == ("global", "global", "global", "none")
    with pytest.raises(StitchError, match="different rope"):
        check_uniform_layers(ExecutorchDecoder(model, 16))


@pytest.mark.parametrize("setting", [dict(final_logit_softcapping=30.0), dict(attn_logit_softcapping=50.0),
                                     dict(use_bidirectional_attention=True)])
def test_gemma_settings_edgec_does_not_compute_are_refused(setting):
    from compiler.errors import UsageError
    from compiler.models.families import decoder_config
    from compiler.tiny_models import hf_config

    with pytest.raises(UsageError, match=next(iter(setting))):
        decoder_config(hf_config("gemma3_text", **setting), "gemma3_text", "config.json")
