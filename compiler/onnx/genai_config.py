"""genai_config.json, so that onnxruntime-genai loads and runs the bundle as it is.

An unfused traced decoder keeps separate past/present tensors, which onnxruntime-genai runs with
`past_present_share_buffer` false; once attention is fused to GroupQueryAttention, past and present
share one buffer of the context length (true), as in the builder's models.

With a prompt graph (prompt_graph.py) the decoder is a two-stage pipeline: genai runs the prompt graph on
a prompt (more than one new token) and the model file on each generated token, both on one KV cache.
"""

from __future__ import annotations

from compiler.models.decoder import DecoderConfig

# onnxruntime-genai's model types (its builder writes the same for these architectures).
GENAI_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "smollm3": "smollm3",
              "gemma3_text": "gemma3_text"}


def genai_config(cfg: DecoderConfig, model_file: str, shares_buffer: bool = False, threads: int = 0,
                 prompt_graph: dict | None = None) -> dict:
    """prompt_graph: {"file", "inputs", "outputs"} of a graph genai runs on prompts instead of model_file."""
    eos = list(cfg.eos_token_ids) or [0]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos[0]
    session_options = {"log_id": "onnxruntime-genai", "provider_options": []}
    if threads:  # genai's default is half the logical cores (it assumes two hardware threads a core)
        session_options["intra_op_num_threads"] = threads
    config = {
        "model": {
            "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else eos[0],
            "context_length": cfg.max_sequence_length,
            "decoder": {
                "session_options": session_options,
                "filename": model_file,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad,
            "type": GENAI_TYPE[cfg.family],
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": cfg.max_sequence_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": shares_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    if prompt_graph:
        decoder = config["model"]["decoder"]
        # Each stage's session has its own thread pool, whose threads would spin on past a run and take the
        # cores from the other stage's first run; the stages inherit this from the decoder's options.
        session_options["session.force_spinning_stop"] = "1"
        io = {"inputs": prompt_graph["inputs"], "outputs": prompt_graph["outputs"]}
        decoder["pipeline"] = [
            {"prompt": {"filename": prompt_graph["file"], **io, "run_on_prompt": True, "run_on_token_gen": False}},
            {"tokens": {"filename": model_file, **io, "run_on_prompt": False, "run_on_token_gen": True}},
        ]
        config["model"]["type"] = "decoder-pipeline"
    return config
