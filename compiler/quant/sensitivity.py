"""Per-module quantization sensitivity: how much each module adds to the KL to fp32 when it alone is quantized.

Units are the ONNX graph's quantized modules: per layer `self_attn.qkv_proj` (q, k and v are one packed
MatMulNBits there), `o_proj`, `mlp.gate_proj`, `up_proj`, `down_proj`; `model.embed_tokens`; `lm_head`
(a tied embedding and lm_head share one table, so they are one unit, named `lm_head`).

The measurement runs in PyTorch on the canonical decoder, on calibration windows: the fp32 inputs of
every layer and the reference log-probabilities are computed once, then one unit's weights are swapped
for their dequantized codes (the same codes the quantize pass writes: GPTQ's or round-to-nearest) and only
the layers from that unit's layer on are run again. With `--accuracy-level 4` (int8 activations in
onnxruntime's kernel) the swapped linears also round their inputs to int8 per block as MLAS does, so the
figure is the artifact's rather than weight error alone.

Measuring every unit costs one partial forward each (about 2.5 full forwards per layer); `sensitivities`
measures one KL per layer instead and splits it among the layer's units by the residual error each makes
(see there), at int4 block 128, and scales to the other schemes by the ratio of the unit's output error
||X_s W_s^T - X W^T||^2 (one matmul per unit and scheme). Its rank agreement with the one-at-a-time
measurement on SmolLM2-135M-Instruct is in the quant-auto report (issue 17).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from compiler.models.decoder import CanonicalDecoder, ConcatKVCache
from compiler.quant.blocks import dequantize_blocks, largest_dividing_block, quantize_blocks
from compiler.quant.cpu_linalg import fast_linears, linear

# (bits, block): int4 and int8 in blocks along K; (0, 0) is fp32.
Scheme = tuple[int, int]
FP32: Scheme = (0, 0)
INT4_BLOCKS = (128, 64, 32)
INT8: Scheme = (8, 128)
SCHEMES: tuple[Scheme, ...] = tuple((4, b) for b in INT4_BLOCKS) + (INT8, FP32)
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TORCH_MEMBERS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}


@dataclass
class Unit:
    """One quantized module of the artifact: its module path there, the decoder's Linear/Embedding
    names it covers, and the layer its output first feeds (None: the lm_head, after every layer)."""

    path: str
    members: tuple[str, ...]
    layer: int | None
    shape: tuple[int, int]  # [N, K] of the packed weight

    def block(self, block: int) -> int:
        """The block the quantize pass gives this unit: a tied table's must divide the hidden size."""
        if self.path == "lm_head" and len(self.members) == 2:
            return largest_dividing_block(self.shape[1], block)
        return block

    def nbytes(self, scheme: Scheme) -> int:
        """Bytes of the unit's weights in the artifact at this scheme (symmetric: no zero points)."""
        bits, block = scheme
        n, k = self.shape
        if bits == 0:
            return n * k * 4
        block = self.block(block)
        blocks = -(-k // block)
        return n * blocks * (block * bits // 8 + 4)


def units(model: CanonicalDecoder) -> list[Unit]:
    cfg = model.cfg
    modules = dict(model.named_modules())
    out = []
    for i in range(cfg.num_layers):
        for proj in PROJECTIONS:
            members = tuple(f"model.layers.{i}.{m}" for m in TORCH_MEMBERS.get(proj, (proj,)))
            n = sum(modules[m].weight.shape[0] for m in members)
            out.append(Unit(f"model.layers.{i}.{proj}", members, i, (n, modules[members[0]].weight.shape[1])))
    table = (cfg.vocab_size, cfg.hidden_size)
    if cfg.tie_word_embeddings:
        out.append(Unit("lm_head", ("model.embed_tokens", "lm_head"), 0, table))
    else:
        out += [Unit("model.embed_tokens", ("model.embed_tokens",), 0, table), Unit("lm_head", ("lm_head",), None, table)]
    return out


def quantized_weights(model: CanonicalDecoder, unit: Unit, scheme: Scheme, gptq: dict[int, dict],
                      int8_per_channel: bool = False) -> dict[str, torch.Tensor]:
    """The unit's members' weights as the artifact holds them at this scheme (dequantized): GPTQ's codes
    where `gptq` (int4 block -> torch module name -> (q, scales, zeros)) has them, else round to nearest;
    int8 in blocks of 128 (onnxruntime) or, `int8_per_channel`, one block per row (the .pte's 8da8w)."""
    bits, block = scheme
    modules = dict(model.named_modules())
    out = {}
    for member in unit.members:
        w = modules[member].weight.detach()
        if bits == 0:
            out[member] = w
            continue
        tied_table = member == "model.embed_tokens" and len(unit.members) == 2  # GPTQ'd as the lm_head
        codes = (gptq.get(block, {}) if bits == 4 else {}).get("lm_head" if tied_table else member)
        if codes is None:
            row_block = w.shape[1] if bits == 8 and int8_per_channel else unit.block(block)
            codes = quantize_blocks(w.numpy(), bits, row_block, True, "rtn")
        out[member] = torch.from_numpy(dequantize_blocks(*codes, w.shape[1]))
    return out


def act_quant(x: torch.Tensor, block: int) -> torch.Tensor:
    """MLAS's int8 activations at accuracy level 4: per block of K, symmetric, amax / 127."""
    k = x.shape[-1]
    xb = nn.functional.pad(x, (0, -k % block)).reshape(*x.shape[:-1], -1, block)
    scale = xb.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(xb / torch.where(scale == 0, 1.0, scale)) * scale
    return xq.reshape(*x.shape[:-1], -1)[..., :k]


def per_token_act_quant(x: torch.Tensor, block: int = 0) -> torch.Tensor:
    """XNNPACK's dynamically quantized linears (the .pte's 8da4w/8da8w): int8 per token, asymmetric."""
    lo = torch.clamp(x.amin(-1, keepdim=True), max=0)
    hi = torch.clamp(x.amax(-1, keepdim=True), min=0)
    scale = (hi - lo) / 255
    safe = torch.where(scale == 0, 1.0, scale)
    zero = torch.round(-128 - lo / safe)
    return (torch.clamp(torch.round(x / safe) + zero, -128, 127) - zero) * scale


class Probe:
    """fp32 layer inputs and reference log-probabilities on calibration windows; KL of a model whose
    weights are (temporarily) swapped, re-running only the layers the swap can change. `xnnpack`: the
    inputs are rounded as the .pte's linears round them (per token) rather than as MLAS does (per block)."""

    @fast_linears()  # its forwards are most of --quant auto's time
    def __init__(self, model: CanonicalDecoder, sequences: list[list[int]], accuracy_level: int = 4,
                 xnnpack: bool = False):
        self.model = model
        self.accuracy_level = accuracy_level
        self.xnnpack = xnnpack
        self.act_quant = per_token_act_quant if xnnpack else act_quant
        self.modules = dict(model.named_modules())
        with torch.no_grad():
            self.ids = torch.tensor(sequences)
            positions = torch.arange(self.ids.shape[1])[None].expand_as(self.ids)
            x, self.rope, self.mask = model.layer_inputs(self.ids, torch.ones_like(self.ids), positions, 0)
            self.empty = model.empty_cache(x.shape[0])[0]
            self.inputs = [x]
            for layer in model.model.layers:
                self.inputs.append(self._layer(layer, self.inputs[-1]))
            reference = torch.log_softmax(model.lm_head(model.model.norm(self.inputs[-1])), -1)
            # KL(p || q) = sum p log p - sum p z + logsumexp(z) for q = softmax(z): one pass over the logits.
            self.p = reference.exp()
            self.sum_p_log_p = (self.p * reference).sum(-1)

    def _layer(self, layer, x):
        return layer(x, self.rope, ConcatKVCache(self.empty, self.empty, self.mask))

    @contextmanager
    def swapped(self, weights: dict[str, tuple[torch.Tensor, int, int]]):
        """`weights` (module name -> (weight, bits, block)) in place, inputs int8-rounded where the kernel
        rounds them; everything restored after."""
        saved, hooks = {}, []
        try:
            for name, (w, bits, block) in weights.items():
                module = self.modules[name]
                saved[name] = module.weight
                module.weight = nn.Parameter(w, requires_grad=False)
                if bits and self.accuracy_level == 4 and isinstance(module, nn.Linear):
                    hooks.append(module.register_forward_pre_hook(lambda _m, inputs, b=block: (self.act_quant(inputs[0], b),)))
            with torch.no_grad():
                yield
        finally:
            for hook in hooks:
                hook.remove()
            for name, w in saved.items():
                self.modules[name].weight = w
            if self.model.cfg.tie_word_embeddings:  # a swap of either re-ties nothing: restore the tie
                self.model.lm_head.weight = self.model.model.embed_tokens.weight

    @fast_linears()
    def kl(self, weights: dict[str, tuple[torch.Tensor, int, int]], start: int | None) -> float:
        """Mean KL(fp32 || swapped) per token with `weights` swapped in, running from layer `start` (0 with
        the embedding swapped; None: the lm_head only)."""
        with self.swapped(weights):
            if start is None:
                x = self.inputs[-1]
            else:
                x = self.model.model.embed_tokens(self.ids) if start == 0 else self.inputs[start]
                for layer in self.model.model.layers[start:]:
                    x = self._layer(layer, x)
            z = self.model.lm_head(self.model.model.norm(x))
            return float((self.sum_p_log_p - (self.p * z).sum(-1) + torch.logsumexp(z, -1)).mean())

    @fast_linears()
    def layer_error(self, weights: dict[str, tuple[torch.Tensor, int, int]], layer: int) -> float:
        """||layer(x) - fp32 layer(x)||^2 on the residual stream, with `weights` (of that layer) swapped in."""
        with self.swapped(weights):
            return float(((self._layer(self.model.model.layers[layer], self.inputs[layer])
                           - self.inputs[layer + 1]) ** 2).sum())

    def output_errors(self, unit: Unit, quantized: dict[Scheme, dict[str, torch.Tensor]]) -> dict[Scheme, float]:
        """||X_s W_s^T - X W^T||^2 summed over the unit's members, per scheme, on the probe's tokens
        (X_s: the int8-rounded input where the kernel rounds it)."""
        inputs = self._unit_inputs(unit)
        errors = {}
        with torch.no_grad():
            for scheme, weights in quantized.items():
                total = 0.0
                for member, w in weights.items():
                    original = self.modules[member].weight.detach()
                    if member == "model.embed_tokens":
                        total += float(((w - original)[self.ids] ** 2).sum())
                        continue
                    x = inputs[member]
                    xs = self.act_quant(x, unit.block(scheme[1])) if scheme[0] and self.accuracy_level == 4 else x
                    total += float(((linear(xs, w) - linear(x, original)) ** 2).sum())
                errors[scheme] = total
        return errors

    def relative_output_error(self, unit: Unit, weights: dict[str, torch.Tensor], scheme: Scheme) -> float:
        """output_errors over ||X W^T||^2 (the embedding: over its rows' squared norms)."""
        inputs = self._unit_inputs(unit)
        energy = 0.0
        with torch.no_grad():
            for member in weights:
                original = self.modules[member].weight.detach()
                out = original[self.ids] if member == "model.embed_tokens" else linear(inputs[member], original)
                energy += float((out ** 2).sum())
        return self.output_errors(unit, {scheme: weights})[scheme] / max(energy, 1e-30)

    @fast_linears()
    def _unit_inputs(self, unit: Unit) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            if unit.layer is None or unit.members[-1] == "lm_head":
                return {"lm_head": self.model.model.norm(self.inputs[-1])}
            captured, hooks = {}, []
            for member in unit.members:
                hooks.append(self.modules[member].register_forward_pre_hook(
                    lambda _m, inputs, name=member: captured.__setitem__(name, inputs[0])))
            try:
                self._layer(self.model.model.layers[unit.layer], self.inputs[unit.layer])
            finally:
                for hook in hooks:
                    hook.remove()
            return captured


def _swaps(unit: Unit, weights: dict[str, torch.Tensor], scheme: Scheme) -> dict:
    # MLAS quantizes a MatMulNBits' activations in the blocks of its weight.
    return {m: (w, scheme[0], unit.block(scheme[1])) for m, w in weights.items()}


def mixed_kl(probe: Probe, plan: dict[str, Scheme], all_units: list[Unit], weights_of) -> float:
    """The whole model's KL to fp32 with every unit at its planned scheme (`weights_of(unit, scheme)`:
    its members' dequantized weights)."""
    swapped = {}
    for unit in all_units:
        scheme = plan[unit.path]
        if scheme != FP32:
            swapped.update(_swaps(unit, weights_of(unit, scheme), scheme))
    return probe.kl(swapped, 0)


def sensitivities(model: CanonicalDecoder, probe: Probe, gptq: dict[int, dict],
                  measured: bool = False) -> dict[str, dict[Scheme, float]]:
    """Unit path -> scheme -> estimated KL to fp32 with that unit alone quantized so.

    At int4 block 128: a layer's units are quantized together once and the KL that adds is measured
    (re-running the layers after it), giving the layer's gain from squared error on the residual stream
    to KL; each unit's KL is that gain times the residual error it alone makes in its layer (one layer's
    forward). The embedding and lm_head are measured. `measured` measures every unit instead (one partial
    forward each: about 5x the cost; the reference the estimate is checked against). Other schemes are
    scaled by the ratio of the unit's output error."""
    coarse = (4, INT4_BLOCKS[0])
    by_layer: dict[int | None, list[Unit]] = {}
    for unit in units(model):
        by_layer.setdefault(unit.layer if unit.path.startswith("model.layers.") else None, []).append(unit)
    out = {}
    for layer, layer_units in by_layer.items():
        quantized = {u.path: {s: quantized_weights(model, u, s, gptq, probe.xnnpack) for s in SCHEMES if s != FP32}
                     for u in layer_units}
        swaps = {u.path: _swaps(u, quantized[u.path][coarse], coarse) for u in layer_units}
        if layer is None or measured:
            at_coarse = {u.path: probe.kl(swaps[u.path], u.layer) for u in layer_units}
        else:
            together = {name: w for s in swaps.values() for name, w in s.items()}
            gain = probe.kl(together, layer) / max(probe.layer_error(together, layer), 1e-30)
            at_coarse = {path: gain * probe.layer_error(s, layer) for path, s in swaps.items()}
        for unit in layer_units:
            errors = probe.output_errors(unit, quantized[unit.path])
            out[unit.path] = {s: at_coarse[unit.path] * errors[s] / errors[coarse] if errors[coarse] else 0.0
                              for s in errors}
            out[unit.path][FP32] = 0.0
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two equally long lists (no tie correction: KLs are continuous)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def largest_int4_errors(model: CanonicalDecoder, sequences: list[list[int]], blocks: dict[str, int],
                        gptq: dict[int, dict], count: int = 3) -> list[str]:
    """Of the units in `blocks` (path -> its int4 block), the `count` whose codes (GPTQ's where `gptq` has
    them) make the largest relative output error on `sequences`: the cheap half of the sensitivity
    estimate, for a failed build's advice."""
    probe = Probe(model, sequences)
    errors = {}
    for unit in units(model):
        if unit.path in blocks:
            scheme = (4, blocks[unit.path])
            weights = quantized_weights(model, unit, scheme, gptq)
            errors[unit.path] = probe.relative_output_error(unit, weights, scheme)
    return sorted(errors, key=lambda path: -errors[path])[:count]
