"""torchao quantization of the ExecuTorch decoder before torch.export (XNNPACK lowers the patterns).

`--quant int4` means here what it means on the ONNX path with accuracy level 4: int4 weights in blocks
along K (one scale per block, symmetric) and int8 activations quantized dynamically per token, i.e.
torchao's Int8DynamicActivationIntxWeightConfig ("8da4w"), which XNNPACK runs as its dynamically
quantized linear. The embedding takes `--embedding-bits` (8 or 4, per-row/per-block weight-only, run by
ExecuTorch's quantized kernels). A tied lm_head is quantized as a linear of its own (XNNPACK cannot read
the embedding's table layout), which costs one extra int4 copy of the table.
"""

from __future__ import annotations

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
    """Quantize in place; returns counts per scheme for the build report."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if quant.bits != 4 or not quant.symmetric or quant.keep_fp32 or quant.keep_int8 or quant.algo == "clip":
        raise UsageError("--format pte supports --quant int4 with symmetric blocks and --algo rtn or gptq "
                         "(GPTQ's rounding is not carried into torchao); drop --asymmetric/--keep-*/--algo clip")
    counts: dict[str, int] = {}
    if quant.lm_head_bits not in (0, 4):
        raise UsageError(f"--lm-head-bits {quant.lm_head_bits}: --format pte supports 4 (8da4w) or 0 (fp32)")
    if decoder.lm_head.weight is decoder.embed_tokens.weight and quant.lm_head_bits:
        decoder.lm_head.weight = nn.Parameter(decoder.lm_head.weight.detach().clone(), requires_grad=False)
    by_k: dict[int, list[str]] = {}
    for name, module in decoder.named_modules():
        if isinstance(module, nn.Linear) and (name != "lm_head" or quant.lm_head_bits):
            by_k.setdefault(module.in_features, []).append(name)
    for k, names in by_k.items():
        group = group_for(k, quant.block_size)
        wanted = set(names)
        quantize_(decoder, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                weight_granularity=PerGroup(group)),
                  filter_fn=lambda m, fqn: fqn in wanted)
        counts[f"linear_8da4w_group{group}"] = counts.get(f"linear_8da4w_group{group}", 0) + len(names)
    if quant.embedding_bits:
        hidden = decoder.embed_tokens.embedding_dim
        granularity = PerAxis(0) if quant.embedding_bits == 8 else PerGroup(group_for(hidden, quant.block_size))
        dtype = torch.int8 if quant.embedding_bits == 8 else torch.int4
        quantize_(decoder, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
        counts[f"embedding_int{quant.embedding_bits}"] = 1
    return counts
