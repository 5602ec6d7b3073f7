"""A build's memory: its peak resident set estimated from the model's config before any weight is read,
the plan that keeps it within `--memory-budget`, and the checkpoint's pages handed back once a stage is
done with them (release_pages).

The estimate is, per stage, what the stage holds at its peak: the libraries; the fp32 weights the stage
reads (the checkpoint's pages, mapped from the safetensors file when it is stored in fp32, else copies
held throughout); GPTQ's codes and one window of its Hessians; the int4 tensors being made and the
largest fp32 temporary; the runtime that validates. Its constants were fitted on measured builds of a
tiny, the SmolLM2-135M and the Llama-3.2-1B shapes (docs/measurements.md); every build records the
estimate beside the measured peaks (report.json, manifest.json), so it can be checked against reality.
"""

from __future__ import annotations

import json
import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from compiler.errors import UsageError

MB = 2**20
BASE_MB = 330.0  # the interpreter with torch, onnx, onnxruntime and transformers imported
PTE_LIBS_MB = 150.0  # ExecuTorch's and torchao's imports on top
PTE_MAX_SEQ_LEN = 2048  # the .pte's KV cache positions by default (build.DEFAULT_PTE_MAX_SEQ_LEN)
EXPORTER_MB = 130.0  # torch.export and the dynamo exporter tracing the one-layer template (plus its weights)
# With validation, the reference's logits on the validation prompts and what its forward leaves with the
# allocator stay for the rest of the build: about this many positions of logits over the vocabulary.
GOLDEN_POSITIONS = 400
PASSES_MB = 175.0  # the ONNX passes' own working set
# Copies of the embedding table (fp32) at once: the ONNX int4 pass reads the whole table and its quantization
# makes temporaries of its size.
TABLE_COPIES = 1.35
GPTQ_FACTOR_COPIES = 4  # K x K temporaries alive while GPTQ factors the largest Hessian (see _error_feedback_factor)
GPTQ_BATCH_COPIES = 4  # BATCH_ELEMENTS-sized tensors of one batched column loop (weights, shifts, errors, codes)
# The lm_head's rows in flight, in table-sized fp32 units: its row jobs' results and their concatenation into
# codes, and what the allocator keeps from the layers' windows (fitted on the 1B shape's GPTQ).
GPTQ_HEAD_COPIES = 1.55
# The calibration forward's activations and what the allocator keeps: 110 as first fitted on 135M and 1B builds;
# raised so that validated 135M GPTQ builds, with and without a merged adapter, stay under the estimate
# (they peaked 5-7% above with 110, and a run-to-run spread of ~70 MB; the 1B GPTQ build then peaks 16% under
# the estimate).
GPTQ_MB = 300.0
ORT_MB = 146.0  # an onnxruntime session's own memory (fitted on the tiny and 135M builds only)
ORT_INT4_COPIES = 4.6  # onnxruntime's memory per byte of int4 weights (file data, prepacked blocks, arenas)
PTE_INT8_BYTES = 1.0  # torchao's 8da4w weight: int8 codes, a byte per weight until lowering packs them
# fp32 table-sized memory while torchao quantizes the tables a chunk of rows at a time: the chunks' pages in
# flight and what the allocator keeps (fitted on the 1B rtn build)
PTE_TABLE_COPIES = 0.45
PTE_LOWERED_BYTES = 1.42  # per weight, the lowered program (XNNPACK's packed weights, the .pte's buffer)
PTE_LAYER_MB = 2.0  # per layer, what lowering and stitching keep (refitted with the tables in chunks)


@dataclass(frozen=True)
class WeightFacts:
    """Sizes that decide a build's memory, from the decoder's shapes (a model on the meta device)."""

    fp32_mb: float  # every distinct weight in fp32, as the build holds them
    layer_fp32_mb: float
    linear_elements: int  # weights of every Linear (a tied lm_head counted: GPTQ gives it codes of its own)
    embedding_elements: int
    tied: bool
    largest_k: int  # the widest Linear input: GPTQ's largest Hessian is largest_k^2
    layer_hessians_bytes: int  # GPTQ's Hessians of one layer (q/k/v and gate/up share one each)
    num_layers: int
    qkv_elements: int  # every layer's q, k and v weights (the .pte packs them into one new tensor per layer)
    kv_position_bytes: int  # the KV cache of one position, every layer (the .pte holds max_seq_len of them)
    max_positions: int
    vocab_size: int
    stored_fp32: bool  # the safetensors hold fp32: the build maps them instead of copying
    # The checkpoint's fp32 weights that merged adapters write to: the merge copies their mapped pages, and the
    # copies stay to the end of the build (release_pages hands back unmodified pages only).
    merged_mb: float = 0.0

    @classmethod
    def of(cls, cfg, weight_files: list[Path], merged_tensors: set[str] = frozenset()) -> WeightFacts:
        """merged_tensors: the checkpoint tensors (Hugging Face names) that adapters merge into or replace."""
        from compiler.models.decoder import CanonicalDecoder

        with torch.device("meta"):
            model = CanonicalDecoder(cfg)
        distinct = {id(p): p for p in model.parameters()}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        layer = model.model.layers[0]
        hessians = sum(m.in_features ** 2 * 4 for name, m in layer.named_modules()
                       if isinstance(m, nn.Linear) and not name.endswith(("k_proj", "v_proj", "up_proj")))
        qkv = sum(m.weight.numel() for name, m in layer.named_modules()
                  if name.endswith(("q_proj", "k_proj", "v_proj", "qkv_proj")))
        weights = sum(p.numel() for p in distinct.values())
        embedding = model.model.embed_tokens.weight.numel()
        headers = [safetensors_header(path) for path in weight_files]  # each file's header read once
        merged, tied = _elements(headers, merged_tensors), cfg.tie_word_embeddings
        if tied and "lm_head.weight" in merged_tensors:
            # An adapter's saved lm_head unties the model (merge_lora): a new fp32 head beside the table.
            weights, merged, tied = weights + embedding, merged + embedding, False
        return cls(weights * 4 / MB, sum(p.numel() for p in layer.parameters()) * 4 / MB,
                   sum(m.weight.numel() for m in linears), embedding, tied, max(m.in_features for m in linears),
                   hessians, cfg.num_layers, qkv * cfg.num_layers,
                   2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4, cfg.max_sequence_length,
                   cfg.vocab_size, _stored_fp32(headers), merged * 4 / MB)

    @property
    def int4_elements(self) -> int:
        """Weights of the ONNX artifact's int4 tensors: a tied lm_head shares the embedding's table."""
        return self.linear_elements + (0 if self.tied else self.embedding_elements)


def safetensors_header(path: Path) -> dict | None:
    """A safetensors file's JSON header ({name: {"dtype", "shape", ...}}), read without its tensors; None when
    the file is unreadable or malformed (the loading code names what is wrong)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > path.stat().st_size:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def _stored_fp32(headers: list[dict | None]) -> bool:
    """Whether every tensor of the safetensors files is F32 (from their headers; None: unreadable): else the
    build holds fp32 copies, not the mapped file."""
    return all(header is not None and all(isinstance(v, dict) and v.get("dtype") == "F32"
                                          for k, v in header.items() if k != "__metadata__")
               for header in headers)


def _elements(headers: list[dict | None], names: set[str]) -> int:
    """Elements of the named tensors, from the files' headers (names not found count nothing)."""
    total = 0
    for header in headers:
        for name, entry in (header or {}).items():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if name in names and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape):
                total += math.prod(shape)
    return total


@dataclass
class MemoryEstimate:
    """Estimated peak RSS (MB) per stage of one build plan, with the plan's GPTQ window and the budget."""

    stages: dict[str, float]
    budget_mb: float | None = None
    gptq_hessian_bytes: int | None = None  # GPTQ's window: the Hessians held at once (None: no GPTQ)

    @property
    def peak_mb(self) -> float:
        return max(self.stages.values())

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.get)

    def record(self, report_stages: list[dict], measured_peak_mb: float) -> dict:
        """For report.json and the manifest: the estimate beside the measured peak, and per stage the
        estimate beside the process's peak at the stage's end (the stage where it jumps is where it is)."""
        measured = {s["stage"]: s["peak_rss_mb"] for s in report_stages}
        return {
            "budget_mb": self.budget_mb,
            "estimate_mb": round(self.peak_mb),
            "estimate_stage": self.peak_stage,
            "measured_peak_mb": round(measured_peak_mb),
            "error": round(measured_peak_mb / self.peak_mb - 1, 3),
            "gptq_hessian_mb": round(self.gptq_hessian_bytes / MB) if self.gptq_hessian_bytes else None,
            "stages": {name: {"estimate_mb": round(mb), "peak_so_far_mb": measured.get(name)}
                       for name, mb in self.stages.items()},
        }


def estimate(facts: WeightFacts, formats: tuple[str, ...], quant, validate: bool,
             gptq_hessian_bytes: int | None = None) -> MemoryEstimate:
    """The build's peak RSS per stage, for these settings (quant: a QuantConfig or None)."""
    from compiler.quant.gptq import BATCH_ELEMENTS, HESSIAN_BUDGET_BYTES

    weights = facts.fp32_mb
    # Copies stay; mapped pages go back after each stage, except those a merged adapter wrote to.
    held = facts.merged_mb if facts.stored_fp32 else weights
    stages = {"load": BASE_MB + (0.0 if facts.stored_fp32 else 1.5 * weights)}
    golden = facts.vocab_size * 4 * GOLDEN_POSITIONS / MB if validate else 0.0
    base = BASE_MB + golden
    if validate:
        stages["reference"] = base + weights
    block = quant.block_size if quant else 32
    gptq = quant is not None and quant.algo == "gptq"
    grids = len(formats) * (3 if quant is not None and quant.max_kl is not None else 1)  # auto: 3 blocks
    codes = facts.linear_elements * (1 + 5 / block) * grids / MB if gptq else 0.0
    if gptq:
        gptq_hessian_bytes = gptq_hessian_bytes or HESSIAN_BUDGET_BYTES
        # A window's layers: their Hessians, their weights (read by the forward, handed back after the
        # window), the factors of the largest Hessian, the batched column loop's tensors.
        layers = min(facts.num_layers, max(1, gptq_hessian_bytes // facts.layer_hessians_bytes))
        batch = GPTQ_BATCH_COPIES * min(BATCH_ELEMENTS * 4 / MB, layers * facts.layer_fp32_mb)
        work = GPTQ_FACTOR_COPIES * facts.largest_k ** 2 * 4 / MB + batch
        window = layers * (facts.layer_hessians_bytes / MB + facts.layer_fp32_mb) + work
        largest = facts.embedding_elements * 4 / MB
        head = (1 + GPTQ_HEAD_COPIES) * largest + GPTQ_BATCH_COPIES * min(BATCH_ELEMENTS * 4 / MB, largest)
        stages["calibrate_gptq"] = base + held + codes + max(window, head) + GPTQ_MB
    else:
        gptq_hessian_bytes = None
    int4 = facts.int4_elements * (0.5 + 4 / block) / MB if quant else 0.0
    largest = facts.embedding_elements * 4 / MB  # the embedding (a tied lm_head) read whole
    if "onnx" in formats:
        stages["export_onnx"] = base + held + codes + EXPORTER_MB + facts.layer_fp32_mb
        stages["onnx_passes"] = (base + held + codes + int4 + PASSES_MB + TABLE_COPIES * largest if quant
                                 else base + weights + PASSES_MB)
        if validate:
            stages["validate"] = base + held + codes + ORT_MB + (ORT_INT4_COPIES * int4 if quant else weights)
    if "pte" in formats:
        kv_cache = facts.kv_position_bytes * min(facts.max_positions, PTE_MAX_SEQ_LEN) / MB
        # GPTQ's codes stay past the quantization only for a failed validation's advice.
        pte_base = base + PTE_LIBS_MB + held + kv_cache
        kept_codes = codes if validate else 0.0
        elements = facts.linear_elements + facts.embedding_elements  # a tied lm_head quantized apart here
        int8 = elements * (PTE_INT8_BYTES + 4 / block) / MB if quant else 0.0
        qkv = facts.qkv_elements * 4 / MB
        stages["quantize_pte"] = (pte_base + codes + qkv + int8 + PTE_TABLE_COPIES * largest if quant
                                  else pte_base + qkv + weights)
        lowered = elements * PTE_LOWERED_BYTES / MB if quant else 2 * weights
        stages["export_pte"] = pte_base + kept_codes + int8 + lowered + PTE_LAYER_MB * facts.num_layers
        if validate:
            stages["validate_pte"] = pte_base + kept_codes + (lowered if quant else 2 * weights)
    return MemoryEstimate(stages, gptq_hessian_bytes=gptq_hessian_bytes)


def plan(facts: WeightFacts, config) -> MemoryEstimate:
    """The estimate for a BuildConfig, planned to fit its budget (GPTQ's window shrunk down to one layer);
    a UsageError naming the estimate, the budget and what would lower it when no plan fits."""
    quant, formats, validate = config.export.quant, config.export.formats, config.validation.enabled
    budget = config.memory_budget_mb
    planned = estimate(facts, formats, quant, validate)
    if budget is None or planned.peak_mb <= budget:
        planned.budget_mb = budget
        return planned
    if planned.gptq_hessian_bytes:
        # The widest window of layers that fits, down to one layer.
        widest = min(facts.num_layers, max(1, planned.gptq_hessian_bytes // facts.layer_hessians_bytes))
        for layers in range(widest, 0, -1):
            planned = estimate(facts, formats, quant, validate, layers * facts.layer_hessians_bytes)
            if planned.peak_mb <= budget:
                planned.budget_mb = budget
                return planned
    options = []
    if len(formats) > 1:
        options += [(f"--format {f}", estimate(facts, (f,), quant, validate)) for f in formats]
    if quant is not None and quant.algo == "gptq":
        options.append(("--algo rtn", estimate(facts, formats, replace(quant, algo="rtn"), validate)))
    if validate:
        options.append(("--no-validate", estimate(facts, formats, quant, False, planned.gptq_hessian_bytes)))
    lower = [f"{flag} {_size(e.peak_mb)}" for flag, e in options if e.peak_mb < planned.peak_mb]
    advice = f"estimates with {', '.join(lower)}" if lower else "no option lowers it: raise the budget"
    raise UsageError(f"--memory-budget {_size(budget)}: this build needs about {_size(planned.peak_mb)} at its peak "
                     f"({planned.peak_stage}), more than the budget; {advice}")


def _size(mb: float) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def parse_budget(text: str) -> float:
    """'6GB', '6000MB', '1.5G' -> MB (binary units, as RSS is reported)."""
    from devices.bench import parse_size_mb

    return parse_size_mb(text, "--memory-budget")


# madvise(MADV_DONTNEED) and /proc/self/pagemap: Linux only; elsewhere release_pages does nothing.
_MADV_DONTNEED = 4
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61


def release_pages(*arrays) -> int:
    """Hand the kernel back the pages of tensors or arrays that are views of a mapped safetensors file and
    unmodified, so that RSS holds only what a stage still works on; returns the bytes released.

    The checkpoint's fp32 tensors are views of its file (safetensors maps it, copy-on-write): read pages
    stay resident after a stage has converted them. Dropped clean pages read back from the file, the
    same bytes, if touched again. A page written since (a LoRA merge in place) is private memory that
    dropping would lose: a range with any such page, or any page not from a file, is left alone."""
    import mmap

    import numpy as np

    page = mmap.PAGESIZE
    released = 0
    try:
        pagemap = open("/proc/self/pagemap", "rb")
    except OSError:
        return 0
    with pagemap:
        libc = _libc()
        seen = set()
        for a in arrays:
            start, nbytes = _span(a)
            first, last = -(-start // page), (start + nbytes) // page  # whole pages inside the array only
            if last <= first or first in seen:
                continue
            seen.add(first)
            pagemap.seek(first * 8)
            entries = np.frombuffer(pagemap.read((last - first) * 8), dtype=np.uint64)
            present = (entries & np.uint64(_PRESENT)) != 0
            from_file = (entries & np.uint64(_FILE)) != 0
            if not present.any() or (present & ~from_file).any() or ((entries & np.uint64(_SWAPPED)) != 0).any():
                continue
            if libc.madvise(first * page, (last - first) * page, _MADV_DONTNEED) == 0:
                released += int(present.sum()) * page
    return released


_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def populate_for_write(tensor: torch.Tensor) -> None:
    """Make a tensor's pages writable in one call before it is written in place: in a private map of a
    file (the checkpoint's tensors), each page would otherwise take its own copy-on-write fault. Linux
    5.14+; elsewhere, or where the kernel refuses, the write faults the pages in as before."""
    import mmap
    import sys

    start, nbytes = _span(tensor)
    if not nbytes or not sys.platform.startswith("linux"):
        return
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    _libc().madvise(first, start + nbytes - first, _MADV_POPULATE_WRITE)


def release_module_pages(module: nn.Module) -> int:
    """release_pages for every parameter and buffer of a module."""
    return release_pages(*module.parameters(), *module.buffers())


def _span(a) -> tuple[int, int]:
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu" or a.is_sparse or type(a) not in (torch.Tensor, nn.Parameter) or not a.is_contiguous():
            return 0, 0
        return a.data_ptr(), a.numel() * a.element_size()
    interface = getattr(a, "__array_interface__", None)
    if interface is None or not (a.flags.c_contiguous or a.flags.f_contiguous):
        return 0, 0
    return interface["data"][0], a.nbytes


def outside_heap(shape: tuple[int, ...], dtype) -> "np.ndarray":
    """An empty array in an anonymous mapping of its own: for results that outlive the temporaries made
    around them, which under reused_heap would otherwise pin the heap's free space apart."""
    import mmap

    import numpy as np

    count = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize)), dtype, count).reshape(shape)


# mallopt's parameters (glibc's malloc.h), and where glibc's own sliding threshold ends up once a large
# block has been freed (DEFAULT_MMAP_THRESHOLD_MAX, and twice it for trimming): setting any of them stops the
# sliding, so reused_heap leaves them there.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_SETTLED_MMAP_THRESHOLD, _DEFAULT_MMAP_MAX = 32 * 2**20, 65536


@contextmanager
def reused_heap():
    """Large blocks from malloc's heap, kept there when freed, instead of a fresh mapping each: glibc maps
    every block above its threshold (sliding from 128 KiB up to 32 MiB) anew and unmaps it when freed, so
    the kernel zeroes each new temporary's pages one fault at a time (a 1B GPTQ build makes about 30 GB of
    them). On exit the heap's free pages go back. glibc only; elsewhere it does nothing."""
    libc = _libc()
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _SETTLED_MMAP_THRESHOLD)
        trim_heap()


def trim_heap() -> None:
    """The heap's free pages back to the kernel (glibc; elsewhere nothing)."""
    libc = _libc()
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC
