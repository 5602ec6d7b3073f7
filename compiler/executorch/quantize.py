"""torchao quantization of the ExecuTorch decoder before torch.export (XNNPACK lowers the patterns).

`--quant int4` means here what it means on the ONNX path with accuracy level 4: int4 weights in blocks
along K (one scale per block, symmetric) and int8 activations quantized dynamically per token, i.e.
torchao's Int8DynamicActivationIntxWeightConfig ("8da4w"), which XNNPACK runs as its dynamically
quantized linear. The embedding takes `--embedding-bits` (8 or 4, per-row/per-block weight-only, run by
ExecuTorch's quantized kernels). A tied lm_head is quantized as a linear of its own (XNNPACK cannot read
the embedding's table layout), which costs one extra copy of the table at `--lm-head-bits`.

`--keep-int8` / `--lm-head-bits 8` linears are 8da8w (int8 weights per output channel: XNNPACK's int8
GEMM takes no blocks), `--keep-fp32` ones stay fp32; the patterns match the ONNX path's module paths
(`model.layers.0.self_attn.qkv_proj`, `model.embed_tokens`, `lm_head`) and decide over `--lm-head-bits`
and `--embedding-bits`, as there. A `--quant auto` plan sets each module's bits and int4 group (its int8
linears are per channel here, in blocks of 128 on the ONNX path). With --algo gptq the int4 linears take
GPTQ's codes, computed on the grid XNNPACK can hold (compiler/quant/blocks.py). Weight-only int4/int8
linears (fp32 activations, `--accuracy-level` below 4) are refused: ExecuTorch's XNNPACK backend has no such GEMM and folds their
dequantized weights into fp32 constants, so the file would not be quantized at all.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from compiler.config import QuantConfig
from compiler.errors import UsageError
from compiler.memory import release_pages
from compiler.quant.blocks import largest_dividing_block
from compiler.quant.gptq import codes_for


XNNPACK_GROUP_MULTIPLE = 32  # its blockwise int4 linear takes groups that are multiples of 32


def group_for(k: int, block_size: int) -> int:
    """The block along K for a linear of K inputs: the configured one, or the largest power-of-two
    fraction of it that divides K (torchao's per-group quantization needs whole groups)."""
    group = largest_dividing_block(k, block_size)
    if not group:
        raise UsageError(f"--block-size {block_size}: no block of 16 or more divides a layer's {k} inputs; "
                         "use --format onnx for this model")
    return group


def check_pte_quant(quant: QuantConfig) -> None:
    """The quantization options a .pte cannot carry, refused before any work is done."""
    if quant.bits != 4 or not quant.symmetric or quant.algo == "clip":
        raise UsageError("--format pte supports --quant int4 with symmetric blocks and --algo rtn or gptq; "
                         "drop --asymmetric/--algo clip")
    if quant.accuracy_level != 4:
        raise UsageError(f"--accuracy-level {quant.accuracy_level}: --format pte computes with int8 activations "
                         "(level 4) only; ExecuTorch's XNNPACK backend has no weight-only int4/int8 linear (it "
                         "would store those weights as fp32)")


def quantize_decoder(decoder: nn.Module, quant: QuantConfig, precomputed: dict[str, tuple] | None = None) -> dict[str, int]:
    """Quantize in place; returns counts per scheme for the build report: linears 8da4w at 4 bits,
    8da8w (int8 weights per output channel, int8 activations per token: XNNPACK's QD8-F32-QC8W) at 8,
    fp32 at 0; the embedding weight-only. `quant` has passed check_pte_quant (build does it first).
    `precomputed`: GPTQ's codes on the xnnpack grid (compiler/quant/blocks.py) by module path; the int4
    linears whose group they match take them instead of torchao's rounding (counted as `int4_gptq`)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if decoder.lm_head.weight is decoder.embed_tokens.weight and module_bits("lm_head", quant):
        # A parameter of its own, so that quantizing the head leaves the embedding alone; over the same
        # tensor (torchao replaces a weight, never writes it): no fp32 copy of the table.
        decoder.lm_head.weight = nn.Parameter(decoder.lm_head.weight.detach(), requires_grad=False)
    # The largest tables first (the embedding, then the lm_head), while no quantized layer is held yet: what
    # their quantization keeps in flight (chunks of rows, their mapped pages) then adds to the least.
    counts: dict[str, int] = {}
    embedding_bits = module_bits("embed_tokens", quant)
    if embedding_bits:
        hidden = decoder.embed_tokens.embedding_dim
        block = quant.block_for("model.embed_tokens")
        granularity = PerAxis(0) if embedding_bits == 8 else PerGroup(group_for(hidden, block))
        dtype = torch.int8 if embedding_bits == 8 else torch.int4
        # A tied lm_head still to quantize reads the table back from the file.
        _quantize_in_row_chunks(decoder.embed_tokens, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity))
        counts[f"embedding_int{embedding_bits}"] = 1
    by_scheme: dict[tuple[int, int], list[str]] = {}  # (bits, group) -> decoder module names
    for name, module in decoder.named_modules():
        if isinstance(module, nn.Linear):
            bits = module_bits(name, quant)
            group = group_for(module.in_features, quant.block_for(_module_path(name))) if bits == 4 else 0
            if bits == 4 and group % XNNPACK_GROUP_MULTIPLE:
                bits, group = 8, 0  # XNNPACK's blockwise int4 GEMM refuses this K: int8 per channel instead
            by_scheme.setdefault((bits, group), []).append(name)
    for (bits, group), names in sorted(by_scheme.items(), key=lambda item: "lm_head" not in item[1]):
        names.sort(key=lambda name: name != "lm_head")
        if bits == 0:
            counts["linear_fp32"] = len(names)
            continue
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group)) \
            if bits == 4 else Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
        for name in names:  # one at a time, each fp32 source's mapped pages handed back once quantized
            module = decoder.get_submodule(name)
            source = module.weight
            if bits == 4 and precomputed and _take_codes(module, codes_for(precomputed, _module_path(name)), group):
                counts["int4_gptq"] = counts.get("int4_gptq", 0) + 1
                release_pages(source)
            else:
                _quantize_in_row_chunks(module, config)
        counts[f"linear_8da4w_group{group}" if bits == 4 else "linear_8da8w_channel"] = len(names)
    return counts


ROWS_PER_CHUNK = 4096


def _quantize_in_row_chunks(module: nn.Module, config) -> None:
    """torchao's quantize_ of one Linear or Embedding, `ROWS_PER_CHUNK` rows at a time (every scheme here
    scales per row or per block of a row, so the chunks' results are the whole weight's), into one tensor
    of the type torchao made. Its temporaries are a chunk's, not the table's (a 128256-row table's were a
    1B build's peak), and each chunk's fp32 pages go back to the file once quantized."""
    from torchao.quantization import quantize_

    weight = module.weight.detach()
    parts = []
    for start in range(0, weight.shape[0], ROWS_PER_CHUNK):
        rows = weight[start : start + ROWS_PER_CHUNK]
        stand_in = nn.Embedding(1, 1, device="meta") if isinstance(module, nn.Embedding) \
            else nn.Linear(1, 1, bias=False, device="meta")  # the bias stays on the module
        stand_in.weight = nn.Parameter(rows, requires_grad=False)
        quantize_(stand_in, config, filter_fn=lambda m, fqn: fqn == "")
        parts.append(stand_in.weight)
        release_pages(rows)
    first = parts[0]
    joined = type(first)(*(torch.cat([getattr(p, n) for p in parts]) for n in first.tensor_data_names),
                         *(getattr(first, n) for n in first.tensor_attribute_names))
    module.weight = nn.Parameter(joined, requires_grad=False)


def _take_codes(linear: nn.Linear, codes: tuple | None, group: int) -> bool:
    """Make the linear's int4 weight from precomputed codes (q uint8 [N, nb, group] around zero point 2^3,
    scales [N, nb]) when their blocks are its groups: the tensor torchao's 8da4w config would make, holding
    these values, without its rounding pass over the fp32 weight. False (the caller rounds) otherwise."""
    from torchao.quantization.quantize_.workflows import IntxUnpackedToInt8Tensor

    if codes is None:
        return False
    q, scales, _ = codes
    n, k = linear.weight.shape
    if q.shape != (n, k // group, group):
        return False
    qdata = torch.from_numpy(q.reshape(n, k)).to(torch.int8).sub_(8)
    scale = torch.from_numpy(np.ascontiguousarray(scales)).to(linear.weight.dtype)
    weight = IntxUnpackedToInt8Tensor(qdata, scale, torch.zeros(scale.shape, dtype=torch.int8), torch.int4, (1, group),
                                      linear.weight.dtype, "int8_asym_per_token")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return True


def module_bits(name: str, quant: QuantConfig) -> int:
    """Bits for a decoder module, matched on the ONNX path's module paths as there."""
    default = {"lm_head": quant.lm_head_bits, "embed_tokens": quant.embedding_bits}.get(name, 4)
    return quant.bits_for(_module_path(name), default)


def unmatched_patterns(decoder: nn.Module, quant: QuantConfig) -> list[str]:
    """--keep-fp32/--keep-int8 patterns that name no module of the decoder (say, q_proj: packed here)."""
    paths = [_module_path(name) for name, module in decoder.named_modules()
             if isinstance(module, (nn.Linear, nn.Embedding))]
    return [p for p in quant.keep_fp32 + quant.keep_int8 if not any(re.search(p, path) for path in paths)]


def _module_path(name: str) -> str:
    """The canonical model's (and ONNX path's) module path of a decoder module: the body under `model.`."""
    return name if name == "lm_head" else f"model.{name}"
