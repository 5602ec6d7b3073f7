"""The canonical decoder: one export-friendly torch definition of the Llama, Qwen2 and Phi-3 families.

It is what edgec traces for every format. Parameter names follow the Hugging Face Llama layout
(`model.layers.N.self_attn.q_proj.weight`, ...) so that most checkpoints load by name; family
differences (biases, fused projections, partial rotary) are settled by `compiler.models.families`.
The forward takes the KV cache as explicit tensors and returns the grown cache, so the traced graph
has `past_key_values.N.key/value` inputs and `present.N.key/value` outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from compiler.models.vector_math import initialize_vector_math

initialize_vector_math()  # before any multi-threaded cos/sin (rope): see vector_math


@dataclass(frozen=True)
class DecoderConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rotary_dim: int = 0
    rope_type: str = "default"
    rope_inv_freq: tuple[float, ...] = field(default=(), repr=False)
    rope_attention_scaling: float = 1.0
    max_sequence_length: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("rope_inv_freq")
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.rotary_dim = cfg.rotary_dim
        self.scale = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return x * cos + rotate_half(x) * sin
        rot, keep = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)

    def forward(self, x, cos, sin, mask, past_key, past_value):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = self._rope(q, cos, sin)
        k = self._rope(k, cos, sin)
        present_key = torch.cat((past_key, k), dim=-2)
        present_value = torch.cat((past_value, v), dim=-2)
        groups = self.num_heads // self.num_kv_heads
        total = present_key.shape[2]
        # Grouped-query attention: each KV head serves `groups` query heads.
        keys = present_key[:, :, None].expand(batch, self.num_kv_heads, groups, total, self.head_dim)
        values = present_value[:, :, None].expand(batch, self.num_kv_heads, groups, total, self.head_dim)
        keys = keys.reshape(batch, self.num_heads, total, self.head_dim)
        values = values.reshape(batch, self.num_heads, total, self.head_dim)
        scores = torch.matmul(q, keys.transpose(2, 3)) * self.scale + mask
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, values).transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out), present_key, present_value


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past_key, past_value):
        attn, present_key, present_value = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, past_key, past_value
        )
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present_key, present_value


class DecoderBody(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CanonicalDecoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present).

    `past` is flat: key0, value0, key1, value1, ... each [batch, kv_heads, past_len, head_dim].
    `attention_mask` is [batch, past_len + seq] with 1 for real tokens, as onnxruntime-genai feeds it.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer(
            "rope_inv_freq", torch.tensor(cfg.rope_inv_freq, dtype=torch.float32), persistent=False
        )

    def empty_cache(self, batch: int = 1) -> list[torch.Tensor]:
        shape = (batch, self.cfg.num_kv_heads, 0, self.cfg.head_dim)
        return [torch.zeros(shape) for _ in range(2 * self.cfg.num_layers)]

    def layer_inputs(self, input_ids, attention_mask, position_ids, past_len):
        """(embeddings, cos, sin, additive mask) that every layer reads."""
        seq = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)

        # Rope and mask are written the way transformers writes them, so that the exported graph has
        # the shapes onnxscript's ORT fusions (RotaryEmbedding, cos/sin cache, GroupQueryAttention) match.
        inv_freq = self.rope_inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
        freqs = torch.matmul(inv_freq, position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.cfg.rope_attention_scaling != 1.0:
            cos, sin = cos * self.cfg.rope_attention_scaling, sin * self.cfg.rope_attention_scaling
        cos, sin = cos[:, None], sin[:, None]

        # Additive mask [batch, 1, seq, total]: causal over absolute positions, then the padding mask.
        total = past_len + seq
        min_value = torch.finfo(torch.float32).min
        query_pos = torch.arange(past_len, total, device=input_ids.device)
        causal = torch.full((seq, total), min_value, device=input_ids.device)
        causal = causal * (torch.arange(total, device=input_ids.device) > query_pos.reshape(-1, 1))
        causal = causal[None, None].expand(input_ids.shape[0], 1, -1, -1)
        padded = (causal + attention_mask[:, None, None, :].to(causal.dtype)) == 0
        mask = causal.masked_fill(padded, min_value)
        return x, cos, sin, mask

    def forward(self, input_ids, attention_mask, position_ids, *past):
        x, cos, sin, mask = self.layer_inputs(input_ids, attention_mask, position_ids, past[0].shape[2])
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, present_key, present_value = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [present_key, present_value]
        logits = self.lm_head(self.model.norm(x))
        return (logits, *presents)
