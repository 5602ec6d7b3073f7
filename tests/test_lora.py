"""LoRA merge against PEFT's merge_and_unload, with non-zero B matrices, through the real adapter files."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from compiler.tiny_models import ALL_PROJECTIONS, make_adapter
from compiler.frontend.load import build_decoder, read_checkpoint
from compiler.frontend.lora import AdapterSpec, merge_lora

ADAPTER_CASES = {
    "all_projections": ("llama", dict(target_modules=ALL_PROJECTIONS, r=8, alpha=16)),
    "regex_rslora": ("llama", dict(target_modules=r".*\.(gate|down)_proj", use_rslora=True, r=8)),
    "embedding_and_modules_to_save": ("llama", dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])),
    "tied_embedding_lora": ("llama3_tied", dict(target_modules=["embed_tokens", "v_proj"])),
    "tied_lm_head_saved": ("llama3_tied", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "phi3_fused": ("phi3", dict(target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])),
    "qwen2_patterns": ("qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj"], rank_pattern={"k_proj": 2},
                                     alpha_pattern={"v_proj": 3.0})),
    "fan_in_fan_out": ("mistral", dict(target_modules=["q_proj", "up_proj"], fan_in_fan_out=True)),
    "qwen3_qk_norm": ("qwen3", dict(target_modules=["q_proj", "k_proj", "o_proj"])),
    "smollm3_no_rope_layers": ("smollm3", dict(target_modules=ALL_PROJECTIONS)),
    # Gemma's embedding is scaled after the lookup, merged rows included; its norms are (1 + w) in the checkpoint.
    "gemma3_scaled_embedding": ("gemma3", dict(target_modules=[*ALL_PROJECTIONS, "embed_tokens"])),
}


def peft_merged(base_dir, adapter_dirs):
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for adapter in adapter_dirs:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def edgec_merged(base_dir, specs):
    checkpoint = read_checkpoint(base_dir)
    records = merge_lora(checkpoint, specs)
    return build_decoder(checkpoint), records


def logits_of(model, ids):
    with torch.no_grad():
        if hasattr(model, "empty_cache"):
            mask = torch.ones_like(ids)
            return model(ids, mask, torch.arange(ids.shape[1])[None].expand_as(ids), *model.empty_cache(ids.shape[0]))[0]
        return model(ids).logits


IDS = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_merge_equals_peft_merge_and_unload(model_dir, tmp_path, case):
    variant, kwargs = ADAPTER_CASES[case]
    base = model_dir(variant)
    adapter = make_adapter(base, tmp_path / "adapter", **kwargs)
    model, records = edgec_merged(base, [AdapterSpec(adapter)])
    expected = logits_of(peft_merged(base, [adapter]), IDS)
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), IDS)
    assert (expected - base_logits).abs().max() > 1e-2, "the adapter must change the model for the test to mean anything"
    assert (logits_of(model, IDS) - expected).abs().max().item() <= 1e-5
    assert records[0].modules or records[0].replaced


def test_two_adapters_with_weights(llama_dir, tmp_path):
    first = make_adapter(llama_dir, tmp_path / "a", target_modules=["q_proj", "v_proj"], r=4, alpha=8, seed=1)
    second = make_adapter(llama_dir, tmp_path / "b", target_modules=["up_proj", "v_proj"], r=2, alpha=4, seed=2)
    # PEFT has no merge weight; scaling lora_alpha by the weight is the same merged model.
    halved = tmp_path / "b_half"
    halved.mkdir()
    config = json.loads((second / "adapter_config.json").read_text())
    config["lora_alpha"] *= 0.5
    (halved / "adapter_config.json").write_text(json.dumps(config))
    (halved / "adapter_model.safetensors").write_bytes((second / "adapter_model.safetensors").read_bytes())
    model, records = edgec_merged(llama_dir, [AdapterSpec(first), AdapterSpec.parse(f"{second}:0.5")])
    expected = logits_of(peft_merged(llama_dir, [first, halved]), IDS)
    assert (logits_of(model, IDS) - expected).abs().max().item() <= 1e-5
    assert [len(r.modules) for r in records] == [4, 4]
    assert records[1].weight == 0.5
    v_proj = next(m for m in records[1].modules if m["module"].endswith("layers.0.self_attn.v_proj"))
    assert v_proj["rank"] == 2 and v_proj["scale"] == pytest.approx(4 / 2 * 0.5)


def test_adapter_spec_parse():
    assert AdapterSpec.parse("dir/a:0.25").weight == 0.25
    assert str(AdapterSpec.parse("dir/a").path) == "dir/a"
    assert str(AdapterSpec.parse("C:/x:y/a").path) == "C:/x:y/a"
