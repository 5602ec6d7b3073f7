"""Runtime LoRA for the .pte: one program and one foundation data file (`model.ptd`, the base's weights)
for any number of adapters, each adapter a small `.ptd` of its own given to the runtime beside the
foundation (ExecuTorch's program-data separation: `Module(program, data_files=[...])`, Android's
`LlmModule(..., dataFiles)`).

Every LoRA slot is a branch `linear(linear(x, A), B)` added to its base linear, A and B fp32 whatever the
base's quantization. Ranks are static in a program, so a slot has a fixed max rank and a lower-rank adapter
is zero-padded (zero rows of A, zero columns of B: exact); an adapter that leaves a slot alone gives it
zeros, and the all-zero adapter is the base. q, k and v are one packed linear in the .pte, so their slots
are one branch: A stacked [r_q + r_k + r_v, in], B block-diagonal [q + k + v, r_q + r_k + r_v] (one pair of
XNNPACK linears a layer instead of three and a concat; the zero blocks add exact zeros).

XNNPACK stores a constant under the sha256 of its bytes, so the program names its LoRA data by the bytes
it was exported with: each A and B is exported with deterministic placeholder values unique to its module
path, and an adapter's .ptd stores its tensors under those placeholders' names. The program, the foundation
and the names thus depend on the slots only, never on an adapter, and `write_adapter_ptd` writes an
adapter's file without exporting anything. Runtime LoRA lowers every layer (no stitching: the copied
layers would need their own LoRA names).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compiler.errors import UsageError
from compiler.executorch.export import PTE_FILE, ExecutorchDecoder, PteExport, export_pte
from compiler.models.lora_slots import projection_dims

FOUNDATION_FILE = "model.ptd"
FOUNDATION_TAG = "model"  # to_executorch names a data file after its tag
LORA_TAG = "lora"
ALIGNMENT = 16  # XNNPACK's constant alignment (xnnpack_graph_serialize.CONSTANT_TENSOR_ALIGNMENT)

Slots = dict[str, tuple[int, int, int]]  # canonical module path -> (in_features, out_features, max_rank)
Adapter = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B [out, r], scale in B)


def pte_slots(slots) -> Slots:
    """The build's LoraSlots (compiler.models.lora_slots) as this module's slots: every slot at the max rank."""
    return {m: (fan_in, fan_out, slots.max_rank) for m, (fan_in, fan_out) in slots.modules.items()}


def _groups(slots: Slots) -> dict[str, list[str]]:
    """The .pte decoder's module path of each branch -> the canonical modules it stacks, in output order."""
    groups: dict[str, list[str]] = {}
    for module in slots:
        prefix, _, leaf = module.rpartition(".")
        if leaf in ("q_proj", "k_proj", "v_proj"):
            members = [f"{prefix}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
            missing = [m for m in members if m not in slots]
            if missing:
                raise UsageError(f"LoRA slots lack '{missing[0]}': q, k and v are one packed linear in the .pte, "
                                 "so slot them together (LoraSlots.for_adapters does)")
            groups[f"{prefix}.qkv_proj".removeprefix("model.")] = members
        else:
            groups[module.removeprefix("model.")] = [module]
    return {group: members for group, members in groups.items() if any(slots[m][2] for m in members)}


def _placeholder(name: str, shape: tuple[int, int]) -> torch.Tensor:
    """Values derived from `name` alone (sha256 bytes / 256, exact in fp32): XNNPACK names a constant by its
    bytes' hash, so two equal tensors would share one name, and an adapter could not tell them apart."""
    count = math.prod(shape)
    digest = hashlib.sha256(name.encode()).digest()
    raw = np.frombuffer(digest * (count // len(digest) + 1), dtype=np.uint8)[:count]
    return torch.from_numpy(raw.astype(np.float32) / 256.0).reshape(shape)


def _branch_tensors(slots: Slots, group: str, members: list[str], adapter: Adapter | None):
    """A [sum of ranks, in] and block-diagonal B [sum of outs, sum of ranks] of one branch: the adapter's
    pairs zero-padded to the slots' ranks, or the program's placeholders when `adapter` is None."""
    in_features = slots[members[0]][0]
    rank = sum(slots[m][2] for m in members)
    out = sum(slots[m][1] for m in members)
    if adapter is None:
        return _placeholder(f"{group}.lora_a", (rank, in_features)), _placeholder(f"{group}.lora_b", (out, rank))
    a_all, b_all = torch.zeros(rank, in_features), torch.zeros(out, rank)
    row = col = 0
    for member in members:
        _, out_features, slot_rank = slots[member]
        if member in adapter:
            a, b = adapter[member]
            r = a.shape[0]
            if r > slot_rank or tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r):
                raise UsageError(f"LoRA pair for '{member}': A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                                 f"its slot (in {in_features}, out {out_features}, rank {slot_rank})")
            a_all[col : col + r] = a
            b_all[row : row + out_features, col : col + r] = b
        row, col = row + out_features, col + slot_rank
    return a_all, b_all


class LoraLinear(nn.Module):
    """A base linear (fp32 or torchao-quantized) plus the branch linear(linear(x, A), B) in fp32."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(a, requires_grad=False)
        self.lora_b = nn.Parameter(b, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b)


def checked_slots(decoder: ExecutorchDecoder, slots: Slots) -> Slots:
    """The slots, in module order, checked against the decoder's linears. q, k and v come slotted together
    from LoraSlots (compiler.models.lora_slots, the one place that completes them); `_groups` refuses
    slots that are not."""
    cfg = decoder.cfg
    shapes = {f"model.layers.{i}.{projection}": dims for i in range(cfg.num_layers)
              for projection, dims in projection_dims(cfg).items()}
    shapes["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
    for module, (in_features, out_features, _) in slots.items():
        if shapes.get(module) != (in_features, out_features):
            raise UsageError(f"LoRA slot '{module}' ({in_features} -> {out_features}) is not a linear of this model"
                             + (f" (it is {shapes[module][0]} -> {shapes[module][1]})" if module in shapes else ""))
    return dict(sorted(slots.items()))


@dataclass
class LoraPteExport:
    slots: Slots  # as checked_slots returns them: what write_adapter_ptd takes
    foundation_bytes: int
    pte_bytes: int
    export: PteExport  # op counts, timings


def export_pte_with_lora(decoder: ExecutorchDecoder, slots: Slots, metadata: dict, out_dir: str | Path,
                         progress: Callable[[int, int], None] = lambda done, total: None) -> LoraPteExport:
    """Write `model.pte` (the program) and `model.ptd` (the foundation: every base constant) into out_dir for
    a decoder with LoRA branches at `slots`. The decoder is quantized already (its linears 8da4w, the
    branches added here stay fp32), or not; its modules are shared, not changed. Adapters' files come from
    write_adapter_ptd with the slots returned. progress: export_pte's."""
    out_dir = Path(out_dir)
    slots = checked_slots(decoder, slots)
    lora_decoder = _with_branches(decoder, slots)
    placeholders = {}
    for group, members in _groups(slots).items():
        for tensor in _branch_tensors(slots, group, members, None):
            placeholders[_data_key(tensor)] = group
    exported = export_pte(lora_decoder, metadata, reuse_layers=False,
                          constant_tag=lambda name: LORA_TAG if name.endswith(("_lora_a", "_lora_b")) else FOUNDATION_TAG,
                          progress=progress)
    files = exported.data_files
    lora_keys = set(_read_ptd(files[LORA_TAG])) if LORA_TAG in files else set()
    if lora_keys != set(placeholders) or set(files) != {LORA_TAG, FOUNDATION_TAG}:
        # XNNPACK did not take a branch as exported (another ExecuTorch version, a branch left to portable
        # kernels): adapters' files written by name would not fit this program.
        raise RuntimeError(f"the .pte's LoRA data is not what runtime LoRA expects: files {sorted(files)}, "
                           f"{len(lora_keys & set(placeholders))} of {len(placeholders)} LoRA tensors found by name")
    out_dir.mkdir(parents=True, exist_ok=True)
    program_bytes = exported.write_program(out_dir / PTE_FILE)
    (out_dir / FOUNDATION_FILE).write_bytes(files[FOUNDATION_TAG])
    return LoraPteExport(slots, len(files[FOUNDATION_TAG]), program_bytes, exported)


def _with_branches(decoder: ExecutorchDecoder, slots: Slots) -> ExecutorchDecoder:
    """A copy of the decoder (sharing every tensor) whose slotted linears are LoraLinears with placeholders."""
    shared = {id(t): t for t in (*decoder.parameters(), *decoder.buffers())}
    copied = copy.deepcopy(decoder, shared)
    for group, members in _groups(slots).items():
        parent_path, _, leaf = group.rpartition(".")
        parent = copied.get_submodule(parent_path) if parent_path else copied
        a, b = _branch_tensors(slots, group, members, None)
        setattr(parent, leaf, LoraLinear(getattr(parent, leaf), a, b))
    return copied


def _data_key(tensor: torch.Tensor) -> str:
    """The name XNNPACK gives an fp32 constant: the sha256 of its bytes."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def adapter_ptd_bytes(slots: Slots, adapter: Adapter) -> bytes:
    """One adapter's data file for a program exported with these slots (those export_pte_with_lora returned);
    `{}` gives the all-zero adapter, which is the base."""
    from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    unknown = sorted(set(adapter) - set(slots))
    if unknown:
        raise UsageError(f"the adapter targets '{unknown[0]}', which has no LoRA slot in this .pte")
    buffers, named = [], {}
    for group, members in _groups(slots).items():
        for placeholder, tensor in zip(_branch_tensors(slots, group, members, None),
                                       _branch_tensors(slots, group, members, adapter)):
            named[_data_key(placeholder)] = DataEntry(buffer_index=len(buffers), alignment=ALIGNMENT, tensor_layout=None)
            buffers.append(tensor.contiguous().numpy().tobytes())
    return bytes(FlatTensorSerializer().serialize(DataPayload(buffers=buffers, named_data=named)))


def write_adapter_ptd(path: str | Path, slots: Slots, adapter: Adapter) -> int:
    """Write one adapter's .ptd (no export needed: see the module's doc); returns its size in bytes."""
    data = adapter_ptd_bytes(slots, adapter)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return len(data)


def _read_ptd(data: bytes) -> dict[str, bytes]:
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    payload = FlatTensorSerializer().deserialize(Cord(data))
    return {key: bytes(payload.buffers[entry.buffer_index]) for key, entry in payload.named_data.items()}
