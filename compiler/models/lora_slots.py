"""Runtime LoRA slots: which linear modules of the decoder take a LoRA pair at run time, and their shapes.

A slot on module M computes `M(x) + (x A) B` with A [in, r] and B [r, out] supplied per adapter (an
adapter file) and empty (r = 0, the base exactly) when no adapter is active. The slots are fixed at build
time; an adapter added later must fit them (same base shapes, only slotted modules, rank within max_rank).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from compiler.errors import UsageError
from compiler.frontend.lora import LoraPairs
from compiler.models.decoder import DecoderConfig

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Projections that edgec's graphs pack into one matmul: a slot on one of them is a slot on all, so that the
# packed matmul gets one LoRA delta per part (an untargeted part's pair stays empty).
PACKED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),)
DTYPES = ("fp16", "fp32")
_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")


def projection_dims(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of a layer."""
    q, kv, hidden, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    return {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
            "self_attn.o_proj": (q, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
            "mlp.down_proj": (inter, hidden)}


def split_module(module: str) -> tuple[int, str]:
    match = _MODULE.fullmatch(module)
    if not match:
        raise ValueError(module)
    return int(match.group(1)), f"{match.group(2)}.{match.group(3)}"


@dataclass(frozen=True)
class LoraSlots:
    """modules: slotted module path -> (in, out); dtype of the adapters' tensors; the highest rank taken."""

    modules: dict[str, tuple[int, int]]
    max_rank: int
    dtype: str

    @classmethod
    def for_adapters(cls, cfg: DecoderConfig, adapters: list[LoraPairs], dtype: str, max_rank: int | None = None,
                     targets: tuple[str, ...] = ()) -> "LoraSlots":
        """Slots on every module an adapter targets, plus every layer's `targets` projections (for
        adapters added later); max_rank defaults to the highest rank among the adapters."""
        dims = projection_dims(cfg)
        wanted = {m for a in adapters for m in a.modules}
        for target in targets:
            projection = next((p for p in PROJECTIONS if p.endswith("." + target) or p == target), None)
            if projection is None:
                raise UsageError(f"--lora-targets {target}: not a projection (known: "
                                 f"{', '.join(p.split('.')[1] for p in PROJECTIONS)})")
            wanted |= {f"model.layers.{i}.{projection}" for i in range(cfg.num_layers)}
        for module in list(wanted):
            layer, projection = split_module(module)
            for group in PACKED:
                if projection in group:
                    wanted |= {f"model.layers.{layer}.{p}" for p in group}
        if not wanted:
            raise UsageError("--lora runtime: no adapter and no --lora-targets; nothing to make slots for")
        highest = max((r for a in adapters for r in a.ranks().values()), default=0)
        if max_rank is not None and max_rank < highest:
            raise UsageError(f"--lora-max-rank {max_rank}: below the adapters' highest rank ({highest})")
        rank = max_rank or highest
        if rank < 1:
            raise UsageError("--lora runtime without adapters needs --lora-max-rank N")
        modules = {m: dims[split_module(m)[1]] for m in sorted(wanted, key=_order)}
        return cls(modules, rank, dtype)

    def check(self, adapter: LoraPairs, where: str) -> None:
        """Refuse, in one line, an adapter these slots cannot carry."""
        for module, (a, b) in adapter.modules.items():
            if module not in self.modules:
                raise UsageError(f"{where}: targets {module}, which has no LoRA slot in this bundle (slots: "
                                 f"{self.describe_targets()}); rebuild with --lora-targets")
            fan_in, fan_out = self.modules[module]
            if (a.shape[1], b.shape[0]) != (fan_in, fan_out):
                raise UsageError(f"{where}: {module} is {a.shape[1]} -> {b.shape[0]}, the bundle's base has "
                                 f"{fan_in} -> {fan_out}; was the adapter made for another base?")
            if a.shape[0] > self.max_rank:
                raise UsageError(f"{where}: rank {a.shape[0]} on {module} is above the bundle's LoRA slots' "
                                 f"max rank {self.max_rank}; rebuild with --lora-max-rank {a.shape[0]}")

    def describe_targets(self) -> str:
        return ",".join(sorted({split_module(m)[1].split(".")[1] for m in self.modules}))

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "max_rank": self.max_rank,
                "modules": {m: list(d) for m, d in self.modules.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "LoraSlots":
        return cls({m: tuple(d) for m, d in data["modules"].items()}, int(data["max_rank"]), data["dtype"])


def _order(module: str) -> tuple[int, int]:
    layer, projection = split_module(module)
    return layer, PROJECTIONS.index(projection)
