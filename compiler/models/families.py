"""Per-family differences: Hugging Face config -> DecoderConfig, and checkpoint names -> canonical names."""

from __future__ import annotations

import torch

from compiler.errors import UsageError
from compiler.models.decoder import DecoderConfig

# architecture class name -> family
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "SmolLM3ForCausalLM": "smollm3",
    "Gemma3ForCausalLM": "gemma3_text",
}
# Family names are transformers' model types (Gemma 3's text-only model is gemma3_text; gemma3 is multimodal).
MODEL_TYPE_FAMILY = {name: name for name in SUPPORTED_ARCHITECTURES.values()}
# Rope variants whose frequencies do not depend on the sequence length, so one traced graph is exact.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Rope variants that switch frequency tables past the original context (Phi-3.5 / Phi-4-mini's longrope):
# exact with the short table up to the original context, where edgec caps the model's context.
SWITCHED_ROPE_TYPES = ("longrope",)


def supported_list() -> str:
    return ", ".join(SUPPORTED_ARCHITECTURES)


# Gemma 3's rope parameters per layer type; its sliding layers are the decoder's "local" rope.
LAYER_TYPE_ROPE = {"full_attention": "global", "sliding_attention": "local"}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def _rope(hf_config, head_dim: int, where: str, layer_type: str | None = None) -> tuple[str, tuple[float, ...], float, int]:
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if layer_type is not None:
        params = dict(params.get(layer_type) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES + SWITCHED_ROPE_TYPES:
        raise UsageError(f"{where}: rope type '{rope_type}' is not supported (supported: "
                         f"{', '.join(STATIC_ROPE_TYPES + SWITCHED_ROPE_TYPES)})")
    partial = float(params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim * partial)
    if rope_type == "default":
        base = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        scaling = 1.0
    else:
        # transformers' own frequency functions are the reference; reuse them rather than re-deriving.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        # longrope without a sequence length: the short-factor table, transformers' choice up to the
        # original context (decoder_config caps the context there).
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), layer_type=layer_type)
    return rope_type, tuple(float(v) for v in inv_freq.tolist()), float(scaling), rotary_dim


def _refuse_unsupported(hf_config, where: str) -> None:
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(hf_config, name, None) is not None:
            raise UsageError(f"{where}: {name} {getattr(hf_config, name)} is not supported (edgec builds Gemma 3, "
                             "whose configs set it to null; Gemma 2 is not supported)")
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise UsageError(f"{where}: use_bidirectional_attention is not supported (edgec builds causal decoders)")


def _layer_ropes(hf_config, family: str, head_dim: int, where: str):
    """(per-layer rope kinds, local rope table, its attention scaling) where layers differ; else ((), (), 1.0)."""
    num_layers = hf_config.num_hidden_layers
    if family == "smollm3":
        flags = list(getattr(hf_config, "no_rope_layers", None) or [1] * num_layers)
        if len(flags) != num_layers:
            raise UsageError(f"{where}: no_rope_layers has {len(flags)} entries for {num_layers} layers; "
                             "give one per layer (1 = rope, 0 = none)")
        return tuple("global" if flag else "none" for flag in flags), (), 1.0
    if family == "gemma3_text":
        layer_types = list(hf_config.layer_types)
        unknown = sorted(set(layer_types) - set(LAYER_TYPE_ROPE))
        if unknown or len(layer_types) != num_layers:
            raise UsageError(f"{where}: layer_types must name {num_layers} layers, each full_attention or "
                             f"sliding_attention (got {unknown[0] if unknown else len(layer_types)})")
        local_type, local, local_scaling, _ = _rope(hf_config, head_dim, where, "sliding_attention")
        if local_type in SWITCHED_ROPE_TYPES:
            raise UsageError(f"{where}: {local_type} rope on sliding_attention layers is not supported")
        return tuple(LAYER_TYPE_ROPE[t] for t in layer_types), local, local_scaling
    return (), (), 1.0


def decoder_config(hf_config, family: str, where: str, generation_config: dict | None = None) -> DecoderConfig:
    act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise UsageError(f"{where}: hidden_act '{act}' is not supported (edgec supports {', '.join(ACTIVATIONS)})")
    _refuse_unsupported(hf_config, where)
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    gemma = family == "gemma3_text"
    rope_type, inv_freq, scaling, rotary_dim = _rope(hf_config, head_dim, where, "full_attention" if gemma else None)
    layer_rope, local_inv_freq, local_scaling = _layer_ropes(hf_config, family, head_dim, where)

    max_len = int(getattr(hf_config, "max_position_embeddings", 2048))
    if rope_type in SWITCHED_ROPE_TYPES:
        params = dict(getattr(hf_config, "rope_parameters", None) or {})
        original = int(params.get("original_max_position_embeddings")
                       or getattr(hf_config, "original_max_position_embeddings", None) or max_len)
        max_len = min(max_len, original)  # the build warns (compiler.build.load_reference)
    window = getattr(hf_config, "sliding_window", None)
    window_is_opt_in = family in ("qwen2", "qwen3", "smollm3")  # their configs name a window use_sliding_window turns on
    uses_window = window is not None and (not window_is_opt_in or getattr(hf_config, "use_sliding_window", False))
    if gemma:  # the window applies to its sliding_attention layers only
        uses_window = window is not None and "local" in layer_rope
    if uses_window:
        # Within the window, sliding-window attention equals full attention: cap the context there.
        max_len = min(max_len, int(window))

    gen = generation_config or {}
    eos = gen.get("eos_token_id", getattr(hf_config, "eos_token_id", None))
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    return DecoderConfig(
        family=family,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or attention_bias,
        qk_norm=family in ("qwen3", "gemma3_text"),
        o_bias=attention_bias and family != "qwen2",
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        rotary_dim=rotary_dim,
        rope_type=rope_type,
        rope_inv_freq=inv_freq,
        rope_attention_scaling=scaling,
        layer_rope=layer_rope,
        local_rope_inv_freq=local_inv_freq,
        local_rope_attention_scaling=local_scaling,
        attention_scale=float(hf_config.query_pre_attn_scalar) ** -0.5 if gemma else None,
        sandwich_norms=gemma,
        hidden_act=act,
        # As transformers computes it: sqrt(hidden_size) as an fp32 tensor.
        embed_scale=float(torch.tensor(hf_config.hidden_size**0.5)) if gemma else 1.0,
        max_sequence_length=max_len,
        bos_token_id=gen.get("bos_token_id", getattr(hf_config, "bos_token_id", None)),
        eos_token_ids=eos_ids,
        pad_token_id=gen.get("pad_token_id", getattr(hf_config, "pad_token_id", None)),
    )


def to_canonical_state_dict(cfg: DecoderConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/split checkpoint tensors in place into the canonical layout (no copies of whole tensors)."""
    if cfg.family == "phi3":
        q_size = cfg.num_heads * cfg.head_dim
        kv_size = cfg.num_kv_heads * cfg.head_dim
        for i in range(cfg.num_layers):
            prefix = f"model.layers.{i}"
            qkv = state.pop(f"{prefix}.self_attn.qkv_proj.weight", None)
            if qkv is not None:
                q, k, v = torch.split(qkv, [q_size, kv_size, kv_size], dim=0)
                state[f"{prefix}.self_attn.q_proj.weight"] = q
                state[f"{prefix}.self_attn.k_proj.weight"] = k
                state[f"{prefix}.self_attn.v_proj.weight"] = v
            gate_up = state.pop(f"{prefix}.mlp.gate_up_proj.weight", None)
            if gate_up is not None:
                gate, up = torch.split(gate_up, cfg.intermediate_size, dim=0)
                state[f"{prefix}.mlp.gate_proj.weight"] = gate
                state[f"{prefix}.mlp.up_proj.weight"] = up
    if cfg.family == "gemma3_text":
        for i in range(cfg.num_layers):
            prefix = f"model.layers.{i}"
            # Gemma's post_attention_layernorm acts on the attention output; its pre_feedforward_layernorm is
            # the MLP's input norm, the canonical post_attention_layernorm (see DecoderLayer).
            renames = {"post_attention_layernorm": "attention_output_norm",
                       "pre_feedforward_layernorm": "post_attention_layernorm",
                       "post_feedforward_layernorm": "mlp_output_norm"}
            popped = {new: state.pop(f"{prefix}.{old}.weight", None) for old, new in renames.items()}
            state.update({f"{prefix}.{new}.weight": t for new, t in popped.items() if t is not None})
        # Gemma's RMSNorm multiplies by (1 + weight) in fp32: the canonical weight is that sum (new tensors,
        # so that the checkpoint's own stay as read).
        for key in [k for k in state if k.endswith("norm.weight")]:
            state[key] = 1.0 + state[key]
    for key in [k for k in state if k.endswith("rotary_emb.inv_freq")]:
        del state[key]
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state
