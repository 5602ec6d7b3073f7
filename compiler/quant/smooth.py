"""Channel smoothing before GPTQ: per input channel of each quantized linear, a scale s moved from the
activations into the weights (x / s times W * s), as SmoothQuant (Xiao et al., 2023) does and AWQ
(Lin et al., 2024) searches per layer; s = max|x|^alpha / max|W|^(1 - alpha) on calibration text.

The model computes the same function afterwards: 1/s is folded into what produces the channel, an RMSNorm's
weight (q/k/v, gate/up), v_proj's rows (o_proj reads attention's weighted sum of v) or up_proj's rows
(down_proj reads act(gate) * up), so the graph gains no op. What changes is which errors int4 and int8
rounding make: salient input channels get finer weight steps, and activation outliers that set a whole
token's int8 step (XNNPACK rounds activations per token) shrink. GPTQ then runs on W * s with the Hessian
of x / s, diag(1/s) H diag(1/s). A fold point is smoothed only where that lowers its consumers' int4
rounding error on the calibration inputs. Measured in docs/measurements.md.
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from compiler.models.decoder import CanonicalDecoder
from compiler.quant.blocks import absolute_max
from compiler.quant.cpu_linalg import linear_bf16, use_bf16

ALPHA = 0.5
FLOOR = 1e-5  # channels never active on calibration text, and all-zero weight columns, keep a finite scale


def map_from_scratch_file(module: nn.Module, new: set[int]) -> None:
    """The module's parameters whose storage is in `new` (data pointers) written to a scratch safetensors file
    and replaced by views of its mapping: like the checkpoint's, their pages can be handed back once a stage
    is done with them (compiler/memory.py release_pages), where smoothed copies in anonymous memory would
    stay resident until the end (4 GB at the 1B shape). The file is unlinked at once; the mapping stays."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    owners = {name: (parent, leaf) for parent_name, parent in module.named_modules()
              for leaf, p in parent.named_parameters(recurse=False)
              for name in [f"{parent_name}.{leaf}" if parent_name else leaf] if p.data_ptr() in new}
    if not owners:
        return
    handle, path = tempfile.mkstemp(prefix="edgec-smoothed-", suffix=".safetensors")
    os.close(handle)
    try:
        save_file({name: getattr(parent, leaf).detach().contiguous() for name, (parent, leaf) in owners.items()}, path)
        with safe_open(path, framework="pt") as f:
            for name, (parent, leaf) in owners.items():
                setattr(parent, leaf, nn.Parameter(f.get_tensor(name), requires_grad=False))
    finally:
        os.unlink(path)


# The Linears whose input a fold point divides (q/k/v and gate/up share theirs with q_proj's, gate_proj's).
FOLD_POINTS = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj", "self_attn.o_proj")
ERROR_ROWS = 256  # rows of each weight the keep-or-drop check rounds (every n-th row)


def _rounding_error(weights: list[torch.Tensor], hessian: torch.Tensor | None, s: torch.Tensor | None,
                    block: int) -> float:
    """sum tr(E H E^T) over `weights`, E the error of round-to-nearest int4 at `block` on W * s, taken back
    to the input's own scale (s None: no smoothing): the output error on the calibration inputs."""
    from compiler.quant.blocks import rtn_dequantized

    total = 0.0
    for w in weights:
        w = w.detach()[:: max(1, w.shape[0] // ERROR_ROWS)]
        q = rtn_dequantized(w if s is None else w * s, 4, block)
        error = (q if s is None else q / s) - w
        total += float((linear_bf16(error, hessian) * error).sum())  # H symmetric: E H = linear(E, H)
    return total


def _worth_it(s: torch.Tensor, weights: list[torch.Tensor], hessian: torch.Tensor | None, block: int) -> bool:
    """Smoothing a fold point where it lowers the consumers' int4 rounding error on the calibration inputs
    (always, without their Hessian): on some models (a briefly fitted one with a LoRA merged) a fixed alpha
    tripled the int4 KL."""
    if hessian is None:
        return True
    hessian = hessian.bfloat16() if use_bf16() else hessian  # converted once for both products
    return _rounding_error(weights, hessian, s, block) < _rounding_error(weights, hessian, None, block)


def _scale(amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    wmax = torch.stack([absolute_max(w.detach(), 0) for w in weights]).amax(0)
    return amax.clamp(min=FLOOR) ** alpha / wmax.clamp(min=FLOOR) ** (1 - alpha)


def _scale_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach() * s, requires_grad=False)


def _divide_rows(linear: nn.Linear, s: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach() / s[:, None], requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach() / s, requires_grad=False)


def smooth_layer(model: CanonicalDecoder, index: int, amax: dict[str, torch.Tensor],
                 alpha: float = ALPHA, hessians: dict[str, torch.Tensor] | None = None,
                 block: int = 32) -> dict[str, torch.Tensor]:
    """Fold smoothing scales into layer `index` in place (new tensors; the checkpoint's are not written).

    amax: module path -> max |input| per channel on calibration text, for the layer's q_proj, o_proj,
    gate_proj and down_proj (a missing one leaves that fold point alone). hessians: the same modules' H
    of their (unsmoothed) inputs; a fold point is smoothed only where that lowers its consumers' rounding
    error at int4 `block` (_worth_it). Returns module path -> the s its input was divided by, for each of
    those four whose input changed."""
    hessians = hessians or {}
    cfg = model.cfg
    layer = model.model.layers[index]
    attn, mlp = layer.self_attn, layer.mlp
    prefix = f"model.layers.{index}."
    scales = {}
    with torch.no_grad():
        name = prefix + "self_attn.q_proj"
        if name in amax:
            consumers = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
            s = _scale(amax[name], consumers, alpha)
        if name in amax and _worth_it(s, consumers, hessians.get(name), block):
            layer.input_layernorm.weight = nn.Parameter(layer.input_layernorm.weight.detach() / s, requires_grad=False)
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
                _scale_columns(linear, s)
            scales[name] = s
        name = prefix + "mlp.gate_proj"
        if name in amax:
            consumers = [mlp.gate_proj.weight, mlp.up_proj.weight]
            s = _scale(amax[name], consumers, alpha)
        if name in amax and _worth_it(s, consumers, hessians.get(name), block):
            norm = layer.post_attention_layernorm
            norm.weight = nn.Parameter(norm.weight.detach() / s, requires_grad=False)
            for linear in (mlp.gate_proj, mlp.up_proj):
                _scale_columns(linear, s)
            scales[name] = s
        name = prefix + "mlp.down_proj"
        if name in amax:
            s = _scale(amax[name], [mlp.down_proj.weight], alpha)
        if name in amax and _worth_it(s, [mlp.down_proj.weight], hessians.get(name), block):
            _divide_rows(mlp.up_proj, s)
            _scale_columns(mlp.down_proj, s)
            scales[name] = s
        name = prefix + "self_attn.o_proj"
        if name in amax:
            # o_proj's input channel (query head h, dim d) is value head h // group's dim d: the query heads
            # sharing a value head share its scale.
            shape = (cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
            n = attn.o_proj.weight.shape[0]
            grouped_w = attn.o_proj.weight.detach().abs().reshape(n, *shape).amax(2).reshape(n, -1)
            per_value = _scale(amax[name].reshape(shape).amax(1).reshape(-1), [grouped_w], alpha)
            s = per_value.reshape(shape[0], 1, shape[2]).expand(shape).reshape(-1)
        if name in amax and _worth_it(s, [attn.o_proj.weight], hessians.get(name), block):
            _divide_rows(attn.v_proj, per_value)
            _scale_columns(attn.o_proj, s)
            scales[name] = s
    return scales

