"""config.json read as it is, without transformers, where that gives what transformers' config class gives.

Importing transformers and reading a config through AutoConfig costs about 1.2 s of every build (its config
module pulls in modeling code, torch.distributed and torchao), and a build uses nothing else of transformers.
For the plain families (Llama, Mistral, Qwen2, Qwen3) with default rope, every attribute that
families.decoder_config reads is either in config.json or has the same default in each of these config
classes; where a key whose default differs by family (or that a class derives) is missing, or the rope is
scaled (transformers' own functions compute those tables), this returns None and the build reads the config
through transformers. tests/test_load.py checks it against AutoConfig on each family.
"""

from __future__ import annotations

from types import SimpleNamespace

PLAIN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Keys without a default shared by these classes (LlamaConfig's bos 1 / eos 2, Mistral's window 4096,
# Qwen3's head_dim 128, ...): without them in the file, transformers decides.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act")
FAMILY_REQUIRED = {"mistral": ("sliding_window", "head_dim"), "qwen2": ("sliding_window", "use_sliding_window"),
                   "qwen3": ("sliding_window", "use_sliding_window", "head_dim")}
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "max_position_embeddings")
# Keys read with the same default in every plain family's class.
DEFAULTS = {"attention_bias": False, "mlp_bias": False, "head_dim": None}


def plain_config(raw: dict, family: str):
    """config.json's values as attributes (what decoder_config reads of a transformers config), or None."""
    if family not in PLAIN_FAMILIES or any(key not in raw for key in REQUIRED + FAMILY_REQUIRED.get(family, ())):
        return None
    if not all(_positive_int(raw[key]) for key in SIZES) or isinstance(raw["rms_norm_eps"], bool) \
            or not isinstance(raw["rms_norm_eps"], (int, float)):
        return None  # transformers' validation says what is wrong with the value
    theta = _default_rope_theta(raw)
    if theta is None:
        return None
    values = {**DEFAULTS, **raw, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    values.pop("rope_scaling", None)
    return SimpleNamespace(**values)


def _default_rope_theta(raw: dict) -> float | None:
    """The rope base of an unscaled rope, in transformers 5's `rope_parameters` or 4's `rope_theta`; None for
    anything else."""
    parameters = raw.get("rope_parameters")
    if parameters is not None:
        if not isinstance(parameters, dict) or set(parameters) != {"rope_type", "rope_theta"} \
                or parameters["rope_type"] != "default" or raw.get("rope_scaling") is not None:
            return None
        return float(parameters["rope_theta"])
    if raw.get("rope_scaling") is not None or not isinstance(raw.get("rope_theta"), (int, float)):
        return None
    return float(raw["rope_theta"])


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
