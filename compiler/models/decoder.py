"""The canonical decoder: one export-friendly torch definition of the Llama, Mistral, Qwen2, Qwen3, Phi-3,
SmolLM3 and Gemma 3 (text) families.

It is what edgec exports for every format (for ONNX, layer_graph.py writes what tracing it gives; a change
here needs the same change there, which tests/test_layer_graph.py checks). Parameter names follow the Hugging Face Llama layout
(`model.layers.N.self_attn.q_proj.weight`, ...) so that most checkpoints load by name; family
differences (biases, per-head q/k norms, fused projections, partial rotary, layers without rope or with a
second rope table, norms after attention and MLP, the MLP's activation) are settled by
`compiler.models.families`. The forward takes the KV cache as explicit tensors and returns the grown cache,
so the traced graph has `past_key_values.N.key/value` inputs and `present.N.key/value` outputs.

A layer's forward is the same for every export: what an export changes (the ExecuTorch program: its cache,
rope and head layout) it passes in as the `ropes` and `cache` of each call or swaps in as modules.
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
    qk_norm: bool = False  # RMSNorm over head_dim of q and k after projection, before rope (Qwen3, Gemma 3)
    o_bias: bool = False
    mlp_bias: bool = False
    rotary_dim: int = 0
    rope_type: str = "default"
    rope_inv_freq: tuple[float, ...] = field(default=(), repr=False)
    rope_attention_scaling: float = 1.0
    # Per layer: "global" (rope_inv_freq), "local" (local_rope_inv_freq: Gemma 3's sliding layers) or "none"
    # (SmolLM3's no-rope layers); empty means every layer "global".
    layer_rope: tuple[str, ...] = ()
    local_rope_inv_freq: tuple[float, ...] = field(default=(), repr=False)
    local_rope_attention_scaling: float = 1.0
    attention_scale: float | None = None  # None: head_dim ** -0.5 (Gemma 3: query_pre_attn_scalar ** -0.5)
    sandwich_norms: bool = False  # RMSNorm on the attention and MLP outputs too, before the residual add (Gemma 3)
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (Gemma 3)
    embed_scale: float = 1.0  # embeddings times this (Gemma 3: sqrt(hidden_size) rounded to fp32)
    max_sequence_length: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("rope_inv_freq")
        d.pop("local_rope_inv_freq")
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["layer_rope"] = list(self.layer_rope)
        return d

    def rope_of(self, layer: int) -> str:
        return self.layer_rope[layer] if self.layer_rope else "global"


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


class Rope:
    """Rotary embedding at one forward's positions: rotates q or k [batch, heads, seq, head_dim] by cos/sin
    [batch, 1, seq, rotary_dim]; dimensions past rotary_dim (Phi-3's partial rotary) pass unrotated."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int):
        self.cos, self.sin, self.rotary_dim = cos, sin, rotary_dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos, self.sin
        if self.rotary_dim == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        rot, keep = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)


class ConcatKVCache:
    """One layer's attention over a KV cache passed as tensors: this step's keys and values are appended to
    the past ones, and the results (`key`, `value`) are the layer's present outputs."""

    def __init__(self, past_key: torch.Tensor, past_value: torch.Tensor, mask: torch.Tensor):
        self.key, self.value, self.mask = past_key, past_value, mask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [batch, heads, seq, head_dim], k and v [batch, kv_heads, seq, head_dim] -> q's shape."""
        self.key = torch.cat((self.key, k), dim=-2)
        self.value = torch.cat((self.value, v), dim=-2)
        batch, num_kv_heads, total, head_dim = self.key.shape
        num_heads = q.shape[1]
        groups = num_heads // num_kv_heads
        # Grouped-query attention: each KV head serves `groups` query heads.
        keys = self.key[:, :, None].expand(batch, num_kv_heads, groups, total, head_dim)
        values = self.value[:, :, None].expand(batch, num_kv_heads, groups, total, head_dim)
        keys = keys.reshape(batch, num_heads, total, head_dim)
        values = values.reshape(batch, num_heads, total, head_dim)
        scores = torch.matmul(q, keys.transpose(2, 3)) * scale + self.mask
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, values)


class Attention(nn.Module):
    """Projections to heads, per-head q/k norms where the family has them (Qwen3, Gemma 3), rope (None for a
    layer without rope: SmolLM3's), attention over the cache, o_proj. An export changes how heads are laid out
    (`heads`, `rotated_heads`, `merge_heads`), how they are rotated (the `rope` it passes) and attended (the
    `cache` it passes), never these steps' order."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else cfg.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, rope, cache):
        q, k, v = self.project(x, rope)
        return self.o_proj(self.merge_heads(cache.attend(q, k, v, self.scale), x))

    def project(self, x, rope):
        """q, k and v heads of x, q and k normalized per head (where the family does) and rotated."""
        if self.q_norm is None:
            return self.heads(x) if rope is None else self.rotated_heads(x, rope)
        q, k, v = self.heads(x)
        q, k = self.q_norm(q), self.k_norm(k)
        return (q, k, v) if rope is None else (rope(q), rope(k), v)

    def heads(self, x):
        """q [batch, heads, seq, head_dim], k and v [batch, kv_heads, seq, head_dim]."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def rotated_heads(self, x, rope):
        """`heads` with q and k rotated: a layout may rotate them together (nothing comes between)."""
        q, k, v = self.heads(x)
        return rope(q), rope(k), v

    def merge_heads(self, out, x):
        """Attention output [batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim] (x: the layer's input)."""
        batch, seq, _ = x.shape
        return out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)); `act` is a module so that an export can swap in its own form of it."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.act = nn.GELU(approximate="tanh") if cfg.hidden_act == "gelu_pytorch_tanh" else nn.SiLU()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """input_layernorm before attention, post_attention_layernorm before the MLP (Llama's names); with
    sandwich norms also attention_output_norm and mlp_output_norm on what the residual adds (Gemma 3's
    post_attention_layernorm and post_feedforward_layernorm; its pre_feedforward_layernorm is the MLP's)."""

    def __init__(self, cfg: DecoderConfig, index: int = 0):
        super().__init__()
        self.rope = cfg.rope_of(index)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        if cfg.sandwich_norms:
            self.attention_output_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.mlp_output_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        else:
            self.attention_output_norm = self.mlp_output_norm = nn.Identity()

    def forward(self, x, ropes, cache):
        """The one layer forward of every export: `ropes` (by kind, see DecoderConfig.layer_rope) and `cache`
        are the export's (see Attention)."""
        rope = ropes[self.rope]
        x = x + self.attention_output_norm(self.self_attn(self.input_layernorm(x), rope, cache))
        return x + self.mlp_output_norm(self.mlp(self.post_attention_layernorm(x)))


class ScaledEmbedding(nn.Embedding):
    """An embedding whose rows are multiplied by `scale` (Gemma 3's sqrt(hidden_size)); 1.0 adds no op."""

    def __init__(self, num: int, dim: int, scale: float = 1.0):
        super().__init__(num, dim)
        self.scale = scale

    def reset_parameters(self) -> None:
        # A decoder on the meta device (every build makes one before binding a checkpoint's tensors) has
        # nothing to initialize, and nn.Embedding's normal_ there runs torch's Python reference, whose
        # import of torch._dynamo cost 0.5-0.7 s of a build that traces nothing (its trace cached).
        if not self.weight.is_meta:
            super().reset_parameters()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(ids)
        return x if self.scale == 1.0 else x * self.scale


class DecoderBody(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.embed_scale)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CanonicalDecoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present).

    `past` is flat: key0, value0, key1, value1, ... each [batch, kv_heads, past_len, head_dim].
    `attention_mask` is [batch, past_len + seq] with 1 for real tokens, as onnxruntime-genai feeds it.
    """

    none_rope_as_identity = False  # see layer_inputs; the ONNX export sets it
    # The ONNX export may set it: the lm_head on the last position only, which is all a generator reads
    # (onnxruntime-genai sees the static 1 and skips its own slicing); a prefill then skips seq - 1 rows of
    # the largest matmul.
    last_position_logits = False

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
        self.register_buffer(
            "local_rope_inv_freq", torch.tensor(cfg.local_rope_inv_freq, dtype=torch.float32), persistent=False
        )

    def empty_cache(self, batch: int = 1) -> list[torch.Tensor]:
        shape = (batch, self.cfg.num_kv_heads, 0, self.cfg.head_dim)
        return [torch.zeros(shape) for _ in range(2 * self.cfg.num_layers)]

    def layer_inputs(self, input_ids, attention_mask, position_ids, past_len):
        """(embeddings, {rope kind: Rope} for the kinds the layers use, additive mask) that every layer reads.
        "none" is None (no rotation), or with `none_rope_as_identity` a rope of angle 0: cos 1 and sin 0 rotate
        exactly nothing, and the ONNX fusions then take those layers like any other (GroupQueryAttention)."""
        seq = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        kinds = set(self.cfg.layer_rope or ("global",))
        ropes = {"none": None}
        if "none" in kinds and self.none_rope_as_identity:
            ropes["none"] = self._rope(torch.zeros_like(self.rope_inv_freq), 1.0, position_ids)
        if "global" in kinds:
            ropes["global"] = self._rope(self.rope_inv_freq, self.cfg.rope_attention_scaling, position_ids)
        if "local" in kinds:
            ropes["local"] = self._rope(self.local_rope_inv_freq, self.cfg.local_rope_attention_scaling, position_ids)

        # Additive mask [batch, 1, seq, total]: causal over absolute positions, then the padding mask.
        total = past_len + seq
        min_value = torch.finfo(torch.float32).min
        query_pos = torch.arange(past_len, total, device=input_ids.device)
        causal = torch.full((seq, total), min_value, device=input_ids.device)
        causal = causal * (torch.arange(total, device=input_ids.device) > query_pos.reshape(-1, 1))
        causal = causal[None, None].expand(input_ids.shape[0], 1, -1, -1)
        padded = (causal + attention_mask[:, None, None, :].to(causal.dtype)) == 0
        mask = causal.masked_fill(padded, min_value)
        return x, ropes, mask

    def _rope(self, inv_freq, attention_scaling, position_ids) -> Rope:
        # Rope and mask are written the way transformers writes them, so that the exported graph has
        # the shapes onnxscript's ORT fusions (RotaryEmbedding, cos/sin cache, GroupQueryAttention) match.
        inv_freq = inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
        freqs = torch.matmul(inv_freq, position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if attention_scaling != 1.0:
            cos, sin = cos * attention_scaling, sin * attention_scaling
        return Rope(cos[:, None], sin[:, None], self.cfg.rotary_dim)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        x, ropes, mask = self.layer_inputs(input_ids, attention_mask, position_ids, past[0].shape[2])
        presents = []
        for i, layer in enumerate(self.model.layers):
            cache = ConcatKVCache(past[2 * i], past[2 * i + 1], mask)
            x = layer(x, ropes, cache)
            presents += [cache.key, cache.value]
        x = self.model.norm(x)
        if self.last_position_logits:
            x = x[:, -1:]
        return (self.lm_head(x), *presents)
