"""Small Hugging Face models and PEFT adapters made locally (random weights, no hub).

Used by `edgec demo`, the tests and the benchmark scripts, so all of them go through the real loading
code with checkpoints written by transformers' and PEFT's own `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEMO_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model runs on a phone, a Raspberry Pi and a desktop. "
    "edgec compiles a fine-tuned language model with its LoRA adapters into a file an app can run, "
    "and proves that the file computes what the PyTorch model computes. "
    "Once upon a time there was a little robot who liked to count the stars in the night sky. "
)

FAMILY_CONFIGS = {
    "llama": dict(architectures=["LlamaForCausalLM"]),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"]),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"]),
    "phi3": dict(architectures=["Phi3ForCausalLM"]),
    "mistral": dict(architectures=["MistralForCausalLM"]),
    "smollm3": dict(architectures=["SmolLM3ForCausalLM"]),
    # head_dim and query_pre_attn_scalar default to 256 whatever hidden_size is: set to the tiny shape.
    "gemma3_text": dict(architectures=["Gemma3ForCausalLM"], head_dim=16, query_pre_attn_scalar=24),
}

# A SmolLM2-135M-shaped Llama (random weights), the size the acceptance figures use.
SMOLLM2_135M = dict(
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    num_hidden_layers=30,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)

# The Llama-3.2-1B shape (random weights) that issue 18's memory and export-cost figures use; its llama3
# rope_scaling is left out (it changes the rope tables, not the memory or the work).
LLAMA32_1B = dict(
    hidden_size=2048,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=8192,
    num_hidden_layers=16,
    vocab_size=128256,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
)

# The Qwen3-1.7B shape (random weights; q/k RMSNorm per head, head_dim 128), issue 18's second 1B-class model.
QWEN3_1_7B = dict(
    hidden_size=2048,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=6144,
    num_hidden_layers=28,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
)

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(family: str = "llama", **overrides):
    from transformers import AutoConfig

    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family in ("phi3", "mistral", "qwen2", "qwen3"):
        base["sliding_window"] = None
    base.update(FAMILY_CONFIGS[family])
    base.update(overrides)
    if family == "qwen3":  # its config's own head_dim default (128) ignores hidden_size
        base.setdefault("head_dim", base["hidden_size"] // base["num_attention_heads"])
    return AutoConfig.for_model(family, **base)  # the family names are transformers' model types


def make_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on DEMO_TEXT, saved as tokenizer.json (readable by transformers and ORT GenAI)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 400),
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([DEMO_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(directory))


def train_briefly(model, directory: Path, steps: int, seed: int = 0) -> None:
    """Fit the model to DEMO_TEXT for a few steps so that its predictions are confident, as a trained
    model's are: quantization error is then measured against real margins, not random ties."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
    ids = torch.tensor(tokenizer(DEMO_TEXT * 3)["input_ids"])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    window = 32
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - window - 1, (8,), generator=generator)
        batch = torch.stack([ids[s : s + window] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def make_model(directory: str | Path, family: str = "llama", seed: int = 0, tokenizer: bool = True,
               train_steps: int = 0, **overrides):
    """Save a randomly initialised (optionally briefly trained) HF causal LM (safetensors) into `directory`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Larger than the default init so that logits differ clearly between tokens.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    if tokenizer:
        make_tokenizer(directory, config.vocab_size)
    if train_steps:
        train_briefly(model, directory, train_steps, seed)
    model.save_pretrained(str(directory))
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(str(directory))
    return model


def make_adapter(
    base_dir: str | Path,
    directory: str | Path,
    target_modules=("q_proj", "v_proj"),
    r: int = 4,
    alpha: float = 8.0,
    seed: int = 1,
    **lora_kwargs,
):
    """Save a PEFT LoRA adapter for the model in `base_dir`, with non-zero B so that it changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    targets = list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0.0, 0.05)
            elif "modules_to_save" in name:
                p.add_(0.02 * torch.randn_like(p))
    peft_model.save_pretrained(str(directory))
    return Path(directory)
