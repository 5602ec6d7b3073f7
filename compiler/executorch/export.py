"""The ExecuTorch path: the canonical decoder with an in-program KV cache -> torch.export -> XNNPACK -> .pte.

The program follows ExecuTorch's LLM runner conventions (examples/models/llama, extension/llm/runner):
`forward(tokens [1, seq], input_pos [1])` returns the last position's logits [1, vocab]; the KV cache lives
in the program as mutable buffers [1, max_seq_len, kv_heads, head_dim] written in place by
`llama::update_cache`, and attention is `llama::custom_sdpa` over the cache (causal from input_pos); the
runner's metadata methods (get_max_seq_len, get_vocab_size, use_kv_cache, get_bos_id, get_eos_ids, ...) are
constant methods of the program.

The decoder's layers are copies of the canonical model's modules sharing its weight tensors, so that
quantization (which swaps weights for quantized tensors) leaves the fp32 reference untouched.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from compiler.models.decoder import Attention, CanonicalDecoder, RMSNorm
from compiler.executorch.delegate_shapes import shared_delegate_shapes
from compiler.executorch.preprocess_cache import lean_xnnpack_preprocessing
from compiler.executorch.stitch import StitchError, check_uniform_layers, stitch_layers, template_layers
from runtimes.executorch import load_op_libraries

PTE_FILE = "model.pte"


class ExecutorchDecoder(nn.Module):
    """The canonical decoder's embedding, layers, norm and head (copies sharing its weight tensors), run by
    the canonical layer forward with ExecuTorch's substitutions: packed q/k/v (`PackedAttention`), rope as a
    linear (`LinearRope`), the KV cache in the program (`InProgramKVCache`), RMSNorm's mean as a linear
    (`LinearMeanRMSNorm`), and the lm_head on the last position only."""

    def __init__(self, model: CanonicalDecoder, max_seq_len: int):
        super().__init__()
        cfg = model.cfg
        self.cfg = cfg
        self.max_seq_len = max_seq_len
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self.embed_tokens = copy.deepcopy(model.model.embed_tokens, shared)
        self.layers = copy.deepcopy(model.model.layers, shared)
        self.norm = copy.deepcopy(model.model.norm, shared)
        self.lm_head = copy.deepcopy(model.lm_head, shared)
        for layer in self.layers:
            layer.self_attn = PackedAttention(layer.self_attn)
        head_dim, rotary = cfg.head_dim, cfg.rotary_dim or cfg.head_dim
        half = rotary // 2
        # One pair of tables per rope the layers use: "global" (rope_cos/rope_sin), Gemma 3's "local"
        # (rope_local_cos/rope_local_sin); SmolLM3's "none" layers read none.
        self.rope_kinds = sorted(set(cfg.layer_rope or ("global",)) - {"none"})
        for kind in self.rope_kinds:
            inv_freq, scaling = ((model.rope_inv_freq, cfg.rope_attention_scaling) if kind == "global"
                                 else (model.local_rope_inv_freq, cfg.local_rope_attention_scaling))
            cos, sin = _rope_tables(inv_freq, scaling, max_seq_len, head_dim, rotary)
            self.register_buffer(_rope_buffer(kind, "cos"), cos, persistent=False)
            self.register_buffer(_rope_buffer(kind, "sin"), sin, persistent=False)
        rotate = torch.zeros(head_dim, head_dim)
        rotate[torch.arange(half), torch.arange(half) + half] = -1.0
        rotate[torch.arange(half) + half, torch.arange(half)] = 1.0
        self.register_buffer("rope_rotate", rotate, persistent=False)
        # Which of the packed q/k/v heads rope rotates: v's pass through.
        heads = cfg.num_heads + 2 * cfg.num_kv_heads
        self.register_buffer("rope_heads", (torch.arange(heads) < cfg.num_heads + cfg.num_kv_heads).float()[:, None],
                             persistent=False)
        self.mean_of_squares = nn.ModuleList()
        _compute_norms_with_linear_means(self)
        for layer in self.layers:
            if isinstance(layer.mlp.act, nn.GELU) and layer.mlp.act.approximate == "tanh":
                layer.mlp.act = TanhGelu()
        shape = (1, max_seq_len, cfg.num_kv_heads, cfg.head_dim)
        for i in range(cfg.num_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def with_layers(self, indices: tuple[int, ...]) -> ExecutorchDecoder:
        """A decoder of these layers only (and their caches), sharing every module and tensor."""
        chosen = copy.copy(self)  # a new __dict__; the module and buffer tables are copied below
        chosen._modules = dict(self._modules)
        chosen._buffers = {k: v for k, v in self._buffers.items() if not k.startswith(("k_cache_", "v_cache_"))}
        chosen.layers = nn.ModuleList([self.layers[i] for i in indices])
        for new, old in enumerate(indices):
            chosen._buffers[f"k_cache_{new}"] = self._buffers[f"k_cache_{old}"]
            chosen._buffers[f"v_cache_{new}"] = self._buffers[f"v_cache_{old}"]
        return chosen

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + seq <= self.max_seq_len)
        ropes = {"none": None}
        for kind in self.rope_kinds:
            ropes[kind] = LinearRope.at(getattr(self, _rope_buffer(kind, "cos")), getattr(self, _rope_buffer(kind, "sin")),
                                        self.rope_rotate, self.rope_heads, start, seq)
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, ropes, InProgramKVCache(getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}"), start))
        return self.lm_head(self.norm(x[:, -1, :]))


def _rope_buffer(kind: str, which: str) -> str:
    return f"rope_{which}" if kind == "global" else f"rope_{kind}_{which}"


def _rope_tables(inv_freq, scaling, max_seq_len, head_dim, rotary):
    """cos and sin [max_seq_len, head_dim]: dimensions past a partial rotary_dim get cos 1, sin 0."""
    positions = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # fp32 angles, as the reference computes them
    # cos/sin in float64 by numpy, rounded once: tables correctly rounded whatever torch's vector-math
    # library does (its fp32 cos is up to 1 ulp off, and see models/vector_math for worse).
    angles = torch.cat((freqs, freqs), dim=-1).double().numpy()
    cos, sin = torch.ones(max_seq_len, head_dim), torch.zeros(max_seq_len, head_dim)
    cos[:, :rotary] = torch.from_numpy(np.cos(angles) * scaling).float()
    sin[:, :rotary] = torch.from_numpy(np.sin(angles) * scaling).float()
    return cos, sin


class PackedAttention(Attention):
    """The canonical attention with q, k and v as one linear `qkv_proj` (one dynamically quantized matmul per
    layer instead of three: fewer XNNPACK operators per token), its heads in ExecuTorch's layout
    [batch, seq, heads, head_dim]. The canonical model keeps its own three projections."""

    def __init__(self, attn: Attention):
        nn.Module.__init__(self)
        self.__dict__.update({k: v for k, v in vars(attn).items() if not k.startswith("_")})  # head counts, scale
        for name, module in attn.named_children():
            if name not in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm"):
                self.add_module(name, module)
        self.qkv_proj = _packed_linear(attn.q_proj, attn.k_proj, attn.v_proj)
        self.q_norm = self.k_norm = None
        self.qk_norm = PackedHeadNorm(attn.q_norm, attn.k_norm, self.num_heads, self.num_kv_heads) \
            if attn.q_norm is not None else None

    def project(self, x, rope):
        if self.qk_norm is None:
            return super().project(x, rope)
        # Normalized and rotated as packed heads, split at the end: q, k and v then come from one XNNPACK
        # partition, as without q/k norms (split first, they came from two, and the layer could not be stitched).
        heads = self.qk_norm(self._packed_heads(x))
        return self._split(heads if rope is None else rope.packed(heads))

    def heads(self, x):
        return self._split(self._packed_heads(x))

    def rotated_heads(self, x, rope):
        # All heads through rope at once, split at the partition's end (XNNPACK slices only static shapes;
        # these slices are portable copies).
        return self._split(rope.packed(self._packed_heads(x)))

    def merge_heads(self, out, x):
        return out.view(1, -1, self.num_heads * self.head_dim)

    def _packed_heads(self, x):
        # The seq dim is inferred (-1): XNNPACK's reshape takes one inferred dim but no symbolic one, and so a
        # layer is one partition, not three split by portable view_copy nodes.
        return self.qkv_proj(x).view(1, -1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)

    def _split(self, qkv):
        q = qkv[:, :, : self.num_heads]
        k = qkv[:, :, self.num_heads : self.num_heads + self.num_kv_heads]
        v = qkv[:, :, self.num_heads + self.num_kv_heads :]
        return q, k, v


class PackedHeadNorm(nn.Module):
    """Qwen3's and Gemma 3's per-head RMSNorms of q and k over the packed heads [1, seq, heads + 2 kv_heads,
    head_dim]: each q head scaled by q_norm's weight, each k head by k_norm's, v heads kept as they are
    (weight rows 0, `keep` 1), in elementwise ops and the shared MeanOfSquares that XNNPACK takes."""

    def __init__(self, q_norm: RMSNorm, k_norm: RMSNorm, num_heads: int, num_kv_heads: int):
        super().__init__()
        if q_norm.eps != k_norm.eps:
            raise ValueError(f"q_norm eps {q_norm.eps} != k_norm eps {k_norm.eps}")
        self.size, self.eps = q_norm.weight.shape[-1], q_norm.eps
        with torch.no_grad():
            weight = torch.cat([q_norm.weight.expand(num_heads, -1), k_norm.weight.expand(num_kv_heads, -1),
                                torch.zeros(num_kv_heads, self.size)])
            keep = (torch.arange(num_heads + 2 * num_kv_heads) >= num_heads + num_kv_heads).float()[:, None]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.keep = nn.Parameter(keep, requires_grad=False)
        self._mean_of_squares: tuple[MeanOfSquares] | None = None  # set by _compute_norms_with_linear_means

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.weight * torch.rsqrt(self._mean_of_squares[0](x)) + self.keep)


def _packed_linear(*projections: nn.Linear) -> nn.Linear:
    # On the meta device: its own initial weights would be replaced at once.
    packed = nn.Linear(projections[0].in_features, sum(p.out_features for p in projections),
                       bias=any(p.bias is not None for p in projections), device="meta")
    with torch.no_grad():
        packed.weight = nn.Parameter(torch.cat([p.weight for p in projections]), requires_grad=False)
        if packed.bias is not None:
            packed.bias = nn.Parameter(torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features)
                                                  for p in projections]), requires_grad=False)
    return packed


class LinearRope:
    """Rope as x * cos + linear(x, R) * sin over [1, seq, heads, head_dim], R being rotate_half as a constant
    matrix: XNNPACK takes linears and elementwise ops, while the slices and concat of rotate_half would stay
    on portable kernels and split partitions."""

    def __init__(self, cos, sin, packed_cos, packed_sin, rotate):
        self.cos, self.sin, self.packed_cos, self.packed_sin, self.rotate = cos, sin, packed_cos, packed_sin, rotate

    @classmethod
    def at(cls, cos_table, sin_table, rotate, packed_heads, start, seq) -> LinearRope:
        """The tables' rows start .. start + seq; packed q/k/v heads get cos 1, sin 0 where `packed_heads` is 0."""
        cos = cos_table.narrow(0, start, seq)[None, :, None, :]
        packed_cos = cos * packed_heads + (1.0 - packed_heads)
        sin = sin_table.narrow(0, start, seq)[None, :, None, :]
        return cls(cos, sin, packed_cos, sin * packed_heads, rotate)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._rotate(x, self.cos, self.sin)

    def packed(self, qkv: torch.Tensor) -> torch.Tensor:
        return self._rotate(qkv, self.packed_cos, self.packed_sin)

    def _rotate(self, x, cos, sin):
        return x * cos + nn.functional.linear(x, self.rotate) * sin


class InProgramKVCache:
    """One layer's attention over the program's KV cache [1, max_seq_len, kv_heads, head_dim]: k and v
    [1, seq, kv_heads, head_dim] are written at `start` in place by `llama::update_cache`, and
    `llama::custom_sdpa` attends causally from there (output in q's layout)."""

    def __init__(self, k_cache, v_cache, start):
        self.k_cache, self.v_cache, self.start = k_cache, v_cache, start

    def attend(self, q, k, v, scale):
        torch.ops.llama.update_cache(k, self.k_cache, self.start)
        torch.ops.llama.update_cache(v, self.v_cache, self.start)
        return torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, self.start, None, 0.0, True, scale)


class MeanOfSquares(nn.Module):
    """mean(x * x, -1) + eps as a linear with a 1/size row and eps as its bias: XNNPACK's mean takes only 4-D
    inputs, and the bias is an XNNPACK operator fewer per norm (each is reshaped and set up on every call)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.register_buffer("row", torch.full((1, size), 1.0 / size), persistent=False)
        self.register_buffer("eps", torch.tensor([eps]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x * x, self.row, self.eps)


def _compute_norms_with_linear_means(decoder: ExecutorchDecoder) -> None:
    """Every RMSNorm of the decoder, wherever the layers have one, as a LinearMeanRMSNorm; one MeanOfSquares
    per size and eps, kept in `decoder.mean_of_squares`."""
    by_size_eps: dict[tuple[int, float], MeanOfSquares] = {}

    def shared(key: tuple[int, float]) -> MeanOfSquares:
        if key not in by_size_eps:
            by_size_eps[key] = MeanOfSquares(*key)
            decoder.mean_of_squares.append(by_size_eps[key])
        return by_size_eps[key]

    for parent in list(decoder.modules()):
        for name, norm in list(parent.named_children()):
            if isinstance(norm, RMSNorm):
                setattr(parent, name, LinearMeanRMSNorm(norm, shared((norm.weight.shape[-1], norm.eps))))
            elif isinstance(norm, PackedHeadNorm):
                norm._mean_of_squares = (shared((norm.size, norm.eps)),)


class LinearMeanRMSNorm(nn.Module):
    """A canonical RMSNorm (its weight tensor) computed with a MeanOfSquares."""

    def __init__(self, norm: RMSNorm, mean_of_squares: MeanOfSquares):
        super().__init__()
        self.weight = norm.weight
        # In a tuple, not a submodule: one MeanOfSquares serves every norm of its size, and the decoder exports
        # it once (an aliased submodule would be one program input per norm).
        self._mean_of_squares = (mean_of_squares,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(self._mean_of_squares[0](x)))


class TanhGelu(nn.Module):
    """gelu(x, approximate="tanh") written out: ExecuTorch 1.5's XNNPACK partitioner takes aten.gelu whatever its
    `approximate` and serializes the exact (erf) GELU, 2e-3 off Gemma 3's logits; tanh and the arithmetic
    lower to XNNPACK as they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def runner_metadata(cfg, max_seq_len: int, bos_id: int | None, eos_ids: list[int]) -> dict:
    """Constant methods ExecuTorch's LLM runner reads (extension/llm/runner/constants.h)."""
    metadata = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_n_layers": cfg.num_layers,
        "get_vocab_size": cfg.vocab_size,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_eos_ids": eos_ids,
    }
    if bos_id is not None:
        metadata["get_bos_id"] = bos_id
    return metadata


@dataclass
class PteExport:
    program: Any  # executorch's ExecutorchProgramManager, until write_program
    delegated_ops: dict[str, int]  # partitions, nodes, and partitions whose delegate passes were reused
    portable_ops: dict[str, int]  # ops left to ExecuTorch's portable/quantized kernels
    export_s: float
    lower_s: float
    layers: str = "every layer lowered"  # or how many were stitched from the template, or why not
    data_files: dict[str, bytes] = field(default_factory=dict)  # tag -> .ptd bytes (with constant_tag)

    def write_program(self, path: Path) -> int:
        """Writes the .pte from the serialized program's pieces, not from one contiguous copy of it (1 GB and
        3 s at 1B), and lets the program go; returns the file's size."""
        with open(path, "wb") as f:
            self.program.write_to_file(f)
            size = f.tell()
        self.program = None
        return size


def export_pte(decoder: ExecutorchDecoder, metadata: dict, reuse_layers: bool = True,
               constant_tag: Callable[[str], str] | None = None,
               progress: Callable[[int, int], None] = lambda done, total: None) -> PteExport:
    """torch.export with a dynamic sequence length, one to_edge_transform_and_lower with XNNPACK.

    With `reuse_layers`, a model of four or more layers is lowered as a template of layers (0, 1, last)
    whose middle layer is stitched in for the others (`stitch`), and XNNPACK's passes run once per
    distinct partition (`preprocess_cache`). With `constant_tag` (a constant's placeholder name, such as
    `p_layers_0_mlp_up_proj_weight`, -> the name of its data file), every constant goes into those data
    files instead of the program (program-data separation), inside XNNPACK's partitions and outside; every
    layer is lowered then (stitching rebuilds partitions without the tags).

    progress(done, total): steps done of torch.export, the lowering, each stitched layer, to_executorch."""
    import time

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, EdgeProgramManager, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    load_op_libraries()
    if constant_tag is not None:
        reuse_layers = False
    reused: dict = {}
    shape_stats: dict = {}
    logging.getLogger("torch._export").setLevel(logging.ERROR)
    seq = torch.export.Dim("seq_len", min=1, max=decoder.max_seq_len - 1)
    example = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0], dtype=torch.long))
    started = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        num_layers = decoder.cfg.num_layers
        template = template_layers(num_layers) if reuse_layers else None
        steps = 3 + (num_layers - 2 if template else 0)  # stitching lowers layers 1 .. n-2 again, one by one
        compile_config = EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True)
        try:
            if template:
                check_uniform_layers(decoder)  # before the template is traced and lowered for nothing
            traced = decoder.with_layers(template) if template else decoder
            exported = torch.export.export(traced.eval(), example, dynamic_shapes=({1: seq}, {0: 1}), strict=False)
            exported_s = time.perf_counter() - started
            progress(1, steps)
            with lean_xnnpack_preprocessing(reused, reuse=reuse_layers):
                edge = to_edge_transform_and_lower(
                    exported, partitioner=[XnnpackPartitioner()], compile_config=compile_config,
                    constant_methods=metadata,
                    transform_passes=[_constant_tagging_pass(constant_tag)] if constant_tag is not None else None)
                progress(2, steps)
                if template:
                    whole = stitch_layers(edge.exported_program(), decoder, num_layers, _lower_partition,
                                          lambda done, _: progress(2 + done, steps))
                    edge = EdgeProgramManager(whole, metadata, compile_config)
        except StitchError as exc:
            # Outside the reuse context: the fallback is the plain lowering of every layer.
            whole_export = export_pte(decoder, metadata, reuse_layers=False, progress=progress)
            whole_export.layers = f"every layer lowered: stitching not possible ({exc})"
            return whole_export
        # As ExecuTorch's LLM export does: linears left outside XNNPACK as op_linear (not transpose + mm). Only
        # where there are any: the pass re-traces the whole program (4 s at 1B) and changes no byte without them.
        if any(node.target in ConvertToLinearPass.targets for node in edge.exported_program().graph.nodes):
            edge = edge.transform([ConvertToLinearPass()])
        delegated, portable = _op_counts(edge.exported_program().graph_module)
        with shared_delegate_shapes(shape_stats):
            program = edge.to_executorch(ExecutorchBackendConfig(
                extract_delegate_segments=True,
                do_quant_fusion_and_const_prop=True,
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
                # Constants XNNPACK did not take, by name: some are new by now (the quantized embedding's fused
                # weights), without the tagging pass's tag.
                external_constants=(lambda node: constant_tag(node.name)) if constant_tag is not None else False,
            ))
    progress(steps, steps)
    delegated["reused_partitions"] = reused.get("reused", 0)
    delegated["reused_delegate_shapes"] = shape_stats.get("shapes_reused", 0)
    layers = f"layers 0, 1, {num_layers - 1} lowered, {num_layers - 3} stitched from layer 1" if template else PteExport.layers
    data_files = {name: bytes(cord) for name, cord in (program._tensor_data or {}).items()}  # no public getter in 1.5.1
    return PteExport(program, delegated, portable, exported_s, time.perf_counter() - started - exported_s, layers,
                     data_files)


def _constant_tagging_pass(constant_tag: Callable[[str], str]):
    """A pass naming each placeholder's data file, run on the edge program before partitioning (after
    torchao's quantized weights are unwrapped into plain placeholders): XNNPACK's serializer reads the tag
    (`delegate_constant_tag`) for the constants of its partitions, `external_constants` for the others
    (constants only: the KV caches, mutable buffers, stay in the program's planned memory)."""
    from executorch.exir.pass_base import PassResult

    def tag(graph_module):
        for node in graph_module.graph.nodes:
            if node.op == "placeholder":
                node.meta.setdefault("custom", {})["delegate_constant_tag"] = constant_tag(node.name)
        return PassResult(graph_module, True)

    return tag


def _lower_partition(program, template):
    """One XNNPACK partition serialized with the weights bound in `program` (stitching's per-layer step)."""
    try:
        from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
        from executorch.exir.lowered_backend_module import LoweredBackendModule

        isolated = XnnpackBackend.copy_exported_program_for_preprocess(program, template.compile_specs)
        result = XnnpackBackend.preprocess(isolated, template.compile_specs)
        lowered = LoweredBackendModule(program, template.backend_id, result.processed_bytes, template.compile_specs,
                                       result.data_store_output)
    except (ImportError, AttributeError, TypeError) as exc:  # internals of another ExecuTorch version
        raise StitchError(f"ExecuTorch's lowering internals differ: {exc}") from exc
    lowered.meta = {"debug_handle_map": result.debug_handle_map}
    return lowered


def _op_counts(graph_module) -> tuple[dict[str, int], dict[str, int]]:
    """(delegated: partitions and nodes, portable: op type -> nodes outside XNNPACK), from ExecuTorch's
    own delegation summary."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    portable = {op: b.non_delegated for op, b in info.delegation_by_operator.items()
                if b.non_delegated and op != "getitem"}
    return {"xnnpack_partitions": info.num_delegated_subgraphs, "nodes": info.num_delegated_nodes}, portable


# Outside XNNPACK by design: the runner's KV-cache and attention custom ops, the position scalar, shape
# plumbing, and the (quantized) embedding gather, which ExecuTorch runs with its own kernels.
EXPECTED_PORTABLE = {
    "sym_size", "_local_scalar_dense", "_assert_scalar", "add", "mul", "sub", "ge", "le",
    "aten_select_copy_int", "aten_slice_copy_tensor", "aten_view_copy_default", "aten_unsqueeze_copy_default",
    "auto_functionalized_v2", "llama_custom_sdpa_default", "llama_update_cache_default", "aten_embedding_default",
    "torchao_dequantize_affine_default",
}


def unexpected_portable_ops(portable: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in portable.items() if k not in EXPECTED_PORTABLE}
