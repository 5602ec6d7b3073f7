"""torchao quantization of the ExecuTorch decoder before torch.export (XNNPACK lowers the patterns).

`--quant int4` means here what it means on the ONNX path with accuracy level 4: int4 weights in blocks
along K (one scale per block, symmetric) and int8 activations quantized dynamically per token, i.e.
torchao's Int8DynamicActivationIntxWeightConfig ("8da4w"), which XNNPACK runs as its dynamically
quantized linear. The embedding takes `--embedding-bits` (8 or 4, per-row/per-block weight-only, run by
ExecuTorch's quantized kernels). A tied lm_head is quantized as a linear of its own (XNNPACK cannot read
the embedding's table layout), which costs one extra int4 copy of the table.

`--keep-int8` / `--lm-head-bits 8` linears are 8da8w (int8 weights per output channel: XNNPACK's int8
GEMM takes no blocks), `--keep-fp32` ones stay fp32. Weight-only int4/int8 linears (fp32 activations,
`--accuracy-level` below 4) are refused: ExecuTorch's XNNPACK backend has no such GEMM and folds their
dequantized weights into fp32 constants, so the file would not be quantized at all.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from compiler.config import QuantConfig
from compiler.errors import UsageError
from compiler.quant.blocks import largest_dividing_block


def group_for(k: int, block_size: int) -> int:
    """The block along K for a linear of K inputs: the configured one, or the largest power-of-two
    fraction of it that divides K (torchao's per-group quantization needs whole groups)."""
    group = largest_dividing_block(k, block_size)
    if not group:
        raise UsageError(f"--block-size {block_size}: no block of 16 or more divides a layer's {k} inputs; "
                         "use --format onnx for this model")
    return group


def quantize_decoder(decoder: nn.Module, quant: QuantConfig) -> dict[str, int]:
    """Quantize in place; returns counts per scheme for the build report.

    Linears are 8da4w by default, 8da8w (int8 weights per output channel, int8 activations per token:
    XNNPACK's QD8-F32-QC8W) where `--keep-int8` or `--lm-head-bits 8` asks, and stay fp32 where
    `--keep-fp32` does. Patterns match the module paths of the ONNX path (`model.layers.0.self_attn.qkv_proj`,
    `lm_head`)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if quant.bits != 4 or not quant.symmetric or quant.algo == "clip":
        raise UsageError("--format pte supports --quant int4 with symmetric blocks and --algo rtn or gptq "
                         "(GPTQ's rounding is not carried into torchao); drop --asymmetric/--algo clip")
    if quant.accuracy_level != 4:
        raise UsageError(f"--accuracy-level {quant.accuracy_level}: --format pte computes with int8 activations "
                         "(level 4) only; ExecuTorch's XNNPACK backend has no weight-only int4/int8 linear (it "
                         "would store those weights as fp32)")
    if decoder.lm_head.weight is decoder.embed_tokens.weight and quant.lm_head_bits:
        decoder.lm_head.weight = nn.Parameter(decoder.lm_head.weight.detach().clone(), requires_grad=False)
    schemes: dict[str, list[str]] = {}  # scheme -> decoder module names
    for name, module in decoder.named_modules():
        if isinstance(module, nn.Linear):
            schemes.setdefault(_linear_scheme(name, module.in_features, quant), []).append(name)
    counts: dict[str, int] = {}
    for scheme, names in schemes.items():
        wanted = set(names)
        if scheme.startswith("linear_8da4w_group"):
            granularity, dtype = PerGroup(int(scheme.removeprefix("linear_8da4w_group"))), torch.int4
        elif scheme == "linear_8da8w_channel":
            granularity, dtype = PerAxis(0), torch.int8
        else:
            counts[scheme] = len(names)
            continue
        quantize_(decoder, Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity),
                  filter_fn=lambda m, fqn: fqn in wanted)
        counts[scheme] = len(names)
    if quant.embedding_bits:
        hidden = decoder.embed_tokens.embedding_dim
        granularity = PerAxis(0) if quant.embedding_bits == 8 else PerGroup(group_for(hidden, quant.block_size))
        dtype = torch.int8 if quant.embedding_bits == 8 else torch.int4
        quantize_(decoder, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
        counts[f"embedding_int{quant.embedding_bits}"] = 1
    return counts


def _linear_scheme(name: str, in_features: int, quant: QuantConfig) -> str:
    path = name if name == "lm_head" else f"model.{name}"  # the canonical model's (and ONNX path's) module path
    if name == "lm_head":
        bits = quant.lm_head_bits
    elif any(re.search(p, path) for p in quant.keep_fp32):
        bits = 0
    elif any(re.search(p, path) for p in quant.keep_int8):
        bits = 8
    else:
        bits = 4
    if bits == 0:
        return "linear_fp32"
    return "linear_8da8w_channel" if bits == 8 else f"linear_8da4w_group{group_for(in_features, quant.block_size)}"
