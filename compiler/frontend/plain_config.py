"""config.json read as it is, without transformers, where that gives what transformers' config class gives.

Importing transformers and reading a config through AutoConfig costs about 1.2 s of every build (its config
module pulls in modeling code, torch.distributed and torchao), and a build uses nothing else of transformers.
For the plain families (Llama, Mistral, Qwen2, Qwen3) with default rope, every attribute that
families.decoder_config reads is then in config.json, with the types transformers' strict classes accept.
Anything else (a key missing, whose default transformers would choose or derive; a value of another type or
an architecture transformers would refuse; scaled rope, whose tables transformers' own functions compute)
returns None, and the build reads the config through transformers, which also says what is wrong with it.
tests/test_load.py checks it against AutoConfig on each family.
"""

from __future__ import annotations

from types import SimpleNamespace

PLAIN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Keys the file must hold: transformers' defaults and derivations are not repeated here (LlamaConfig's bos 1
# and eos 2, Mistral's window 4096, Qwen3's head_dim 128, ...).
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "max_position_embeddings")
REQUIRED = (*SIZES, "num_key_value_heads", "bos_token_id", "eos_token_id")
FAMILY_REQUIRED = {"mistral": ("sliding_window", "head_dim"), "qwen2": ("sliding_window", "use_sliding_window"),
                   "qwen3": ("sliding_window", "use_sliding_window", "head_dim")}
# Keys read with the same default in every plain family's class (Qwen2.5's config.json has no pad_token_id).
DEFAULTS = {"attention_bias": False, "mlp_bias": False, "head_dim": None, "pad_token_id": None, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def plain_config(raw: dict, family: str):
    """config.json's values as attributes (what decoder_config reads of a transformers config), or None."""
    # AutoConfig picks the class by model_type; the family comes from the architecture.
    if family not in PLAIN_FAMILIES or raw.get("model_type") != family:
        return None
    values = {**DEFAULTS, **raw}
    if any(key not in raw for key in REQUIRED + FAMILY_REQUIRED.get(family, ())) or not _plain_values(values):
        return None
    theta = _default_rope_theta(raw)
    if theta is None:
        return None
    values["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    values.pop("rope_scaling", None)
    return SimpleNamespace(**values)


def _plain_values(raw: dict) -> bool:
    """The values are of the types transformers accepts and describe heads it would accept."""
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    return (all(_positive_int(raw[key]) for key in SIZES)
            and (raw["num_key_value_heads"] is None or _positive_int(raw["num_key_value_heads"]))
            and (head_dim is None or _positive_int(head_dim) and head_dim % 2 == 0)
            and raw["hidden_size"] % heads == 0
            and type(raw["rms_norm_eps"]) is float and type(raw["tie_word_embeddings"]) is bool
            and isinstance(raw["hidden_act"], str)
            and all(_token_ids(raw[key]) for key in ("bos_token_id", "eos_token_id", "pad_token_id")))


def _default_rope_theta(raw: dict) -> float | None:
    """The rope base of an unscaled rope, in transformers 5's `rope_parameters` or 4's `rope_theta`; None for
    anything else."""
    parameters = raw.get("rope_parameters")
    if raw.get("rope_scaling") is not None:
        return None
    if parameters is not None:
        if not isinstance(parameters, dict) or set(parameters) != {"rope_type", "rope_theta"} \
                or parameters["rope_type"] != "default":
            return None
        theta = parameters["rope_theta"]
    else:
        theta = raw.get("rope_theta")
    return float(theta) if _number(theta) and theta > 0 else None


def _positive_int(value) -> bool:
    return type(value) is int and value > 0


def _number(value) -> bool:
    return type(value) in (int, float)


def _token_ids(value) -> bool:
    return value is None or type(value) is int or (type(value) is list and all(type(v) is int for v in value))
