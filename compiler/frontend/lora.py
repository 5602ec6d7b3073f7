"""Merge PEFT LoRA adapters into checkpoint tensors, in fp32, before anything is quantized or traced.

Merging works on Hugging Face names (before the canonical renaming), so an adapter made for Phi-3's fused
`qkv_proj` merges into that fused tensor exactly as PEFT's `merge_and_unload` would. The merged weight is
`W + weight * scale * (B @ A)`, `scale = alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compiler.errors import UsageError
from compiler.frontend.load import PICKLE_SUFFIXES, Checkpoint, _read_json, read_safetensors, sha256_file
from compiler.memory import populate_for_write, safetensors_header

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Adapter options that change what the adapted model computes in ways a plain merge cannot express.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters",
    "trainable_token_indices": "trainable token indices",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
}


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class AdapterSpec:
    path: Path
    weight: float = 1.0
    name: str | None = None  # runtime LoRA: the adapter's name in the bundle (default: the directory's)

    @classmethod
    def parse(cls, text: str) -> "AdapterSpec":
        """`[NAME=]DIR[:WEIGHT]`; a weight is only taken when the part after the last colon is a number, a
        name only when the part before the first '=' is a plain name (no path separator)."""
        name = None
        head, sep, rest = text.partition("=")
        if sep and "/" not in head and head:
            if not ADAPTER_NAME.fullmatch(head):
                raise UsageError(f"--adapter {text}: adapter name '{head}' must be letters, digits, '_', '.' or '-' "
                                 "(at most 64, starting with a letter or digit)")
            name, text = head, rest
        path, _, weight = text.rpartition(":")
        if path:
            try:
                return cls(Path(path), float(weight), name)
            except ValueError:
                pass
        return cls(Path(text), 1.0, name)

    @property
    def runtime_name(self) -> str:
        return self.name or self.path.resolve().name

    def to_dict(self) -> dict:
        d = {"path": str(self.path), "weight": self.weight}
        if self.name:
            d["name"] = self.name
        return d


@dataclass
class MergeRecord:
    """What one adapter changed, for the build report."""

    path: str
    weight: float
    sha256: dict[str, str]
    modules: list[dict] = field(default_factory=list)  # {"module", "rank", "scale"}
    replaced: list[str] = field(default_factory=list)  # modules_to_save / saved base layers
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "weight": self.weight,
            "sha256": self.sha256,
            "modules_merged": len(self.modules),
            "modules": self.modules,
            "replaced": self.replaced,
            "notes": self.notes,
        }


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name suffix (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_names(state: dict[str, torch.Tensor]) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight")}


def _check_targets(config: dict, modules: set[str], where: Path) -> None:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, m) for m in modules):
            raise UsageError(f"{where}: target_modules regex '{targets}' matches no module of the base model")
    elif isinstance(targets, list):
        for target in targets:
            if target in ("all-linear",):
                continue
            if not any(m == target or m.endswith("." + target) for m in modules):
                raise UsageError(
                    f"{where}: target module '{target}' is absent from the base model; "
                    "was the adapter made for another base?"
                )


def _read_adapter(spec: AdapterSpec) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    directory = spec.path
    if not directory.is_dir():
        raise UsageError(f"{directory}: adapter directory does not exist")
    config_path = directory / "adapter_config.json"
    if not config_path.exists():
        raise UsageError(f"{directory}: no adapter_config.json; pass a PEFT adapter directory")
    config = _read_json(config_path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UsageError(
            f"{config_path}: adapter type '{config.get('peft_type')}' is not supported; edgec merges LoRA adapters only"
        )
    for option, what in UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise UsageError(f"{config_path}: {what} ('{option}') is not supported; retrain as a plain LoRA adapter")
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.exists():
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UsageError(
                f"{directory}: adapter weights only as pickle ({pickles[0]}); edgec never unpickles. "
                "Re-save with save_pretrained(dir, safe_serialization=True)"
            )
        raise UsageError(f"{directory}: missing {ADAPTER_WEIGHTS}")
    tensors = read_safetensors(weights_path, what="adapter weights")
    hashes = {p.name: sha256_file(p) for p in (config_path, weights_path)}
    return config, tensors, hashes


LORA_KEYS = (
    (".lora_A.weight", "A", False),
    (".lora_B.weight", "B", False),
    (".lora_embedding_A", "A", True),
    (".lora_embedding_B", "B", True),
)


def _lora_part(key: str) -> tuple[str, str, bool] | None:
    """(module, "A" or "B", embedding) of a LoRA pair's tensor key, or None for any other key."""
    name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    for suffix, part, embedding in LORA_KEYS:
        if name.endswith(suffix):
            return name[: -len(suffix)], part, embedding
    return None


def _replaced_name(key: str) -> str:
    """The base tensor a modules_to_save or saved embedding layer's tensor replaces outright."""
    name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    return name.replace(".modules_to_save.default", "").replace(".base_layer", "")


def merged_tensors(adapters: list[AdapterSpec]) -> set[str]:
    """The checkpoint tensors these adapters merge into or replace, from their files' headers alone (for the
    memory estimate; an unreadable adapter counts nothing here, and merge_lora names what is wrong)."""
    names = set()
    for spec in adapters:
        for key in safetensors_header(spec.path / ADAPTER_WEIGHTS) or {}:
            if key == "__metadata__":
                continue
            lora = _lora_part(key)
            names.add(lora[0] + ".weight" if lora else _replaced_name(key))
    return names


def _group(tensors: dict[str, torch.Tensor], where: Path):
    """Split adapter tensors into LoRA pairs {module: {"A", "B", "embedding"}} and full replacements."""
    pairs: dict[str, dict] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        lora = _lora_part(key)
        if lora:
            module, part, embedding = lora
            pairs.setdefault(module, {})[part] = tensor
            pairs[module]["embedding"] = embedding
        elif ".lora_" in key or "lora_magnitude" in key:
            raise UsageError(f"{where}: adapter tensor '{key}' is of a kind edgec does not merge")
        else:
            replacements[_replaced_name(key)] = tensor
    for module, parts in pairs.items():
        if "A" not in parts or "B" not in parts:
            raise UsageError(f"{where}: module '{module}' has only lora_{'A' if 'A' in parts else 'B'}; the adapter file is incomplete")
    return pairs, replacements


def _checked_pair(module: str, parts: dict, config: dict, base: torch.Tensor, weights_path: Path, use_rslora: bool):
    """(A [r, in], B [out, r], r, scale) of one module's LoRA pair, checked against the base weight."""
    a, b = parts["A"].float(), parts["B"].float()
    rank = a.shape[0]
    configured_rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    expected = (base.shape[1], base.shape[0]) if parts["embedding"] else tuple(base.shape)
    if b.shape[1] != rank or (b.shape[0], a.shape[1]) != expected or rank != configured_rank:
        raise UsageError(
            f"{weights_path}: module '{module}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
            f"(r={configured_rank}), which do not fit the base weight {tuple(base.shape)}; "
            "was the adapter made for another base?"
        )
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
    scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    return a, b, rank, scale


def merge_lora(checkpoint: Checkpoint, adapters: list[AdapterSpec], after_each=None,
               progress: Callable[[int, int], None] = lambda done, total: None) -> list[MergeRecord]:
    """Merge each adapter into the checkpoint's tensors in place; returns one record per adapter.

    after_each(index) runs after each adapter is merged (the build takes a reference there).
    progress(done, total): modules merged or replaced, over all adapters."""
    records = []
    state = checkpoint.state
    tied_embeddings = checkpoint.config.tie_word_embeddings
    # Every adapter read first (they are small beside the base): the total of modules is known up front.
    read = []
    for spec in adapters:
        config, tensors, hashes = _read_adapter(spec)
        read.append((spec, config, hashes, *_group(tensors, spec.path / ADAPTER_WEIGHTS)))
    total, done = sum(len(pairs) + len(replacements) for *_, pairs, replacements in read), 0
    for spec, config, hashes, pairs, replacements in read:
        weights_path = spec.path / ADAPTER_WEIGHTS
        modules = _module_names(state)
        if tied_embeddings:
            modules.add("lm_head")
        _check_targets(config, modules, spec.path / "adapter_config.json")
        record = MergeRecord(str(spec.path), spec.weight, hashes)
        if config.get("fan_in_fan_out"):
            # PEFT resets fan_in_fan_out to False for nn.Linear targets, which is every target here.
            record.notes.append("fan_in_fan_out ignored: the targets are Linear layers, as PEFT does")

        for name, tensor in sorted(replacements.items()):
            if name not in state and not (tied_embeddings and name == "lm_head.weight"):
                raise UsageError(f"{weights_path}: adapter replaces '{name}', which is absent from the base model")
            if name in state and tuple(state[name].shape) != tuple(tensor.shape):
                raise UsageError(
                    f"{weights_path}: '{name}' has shape {tuple(tensor.shape)}, the base has {tuple(state[name].shape)}; "
                    "was the adapter made for another base?"
                )
            state[name] = tensor.float().clone()
            record.replaced.append(name.rsplit(".", 1)[0])
            done += 1
            progress(done, total)

        use_rslora = bool(config.get("use_rslora"))
        for module, parts in sorted(pairs.items()):
            key = module + ".weight"
            if key not in state:
                if tied_embeddings and module == "lm_head":
                    raise UsageError(
                        f"{weights_path}: adapter targets lm_head, which this model ties to embed_tokens; "
                        "edgec does not merge into tied weights"
                    )
                raise UsageError(
                    f"{weights_path}: target module '{module}' is absent from the base model; "
                    "was the adapter made for another base?"
                )
            a, b, rank, scale = _checked_pair(module, parts, config, state[key], weights_path, use_rslora)
            delta = b @ a
            if parts["embedding"]:
                delta = delta.T
            # In place: checkpoint tensors are private copy-on-write maps of the safetensors file, so
            # only the pages merged into are copied (the file itself is never written; a test checks),
            # all of a tensor's in one call rather than a fault each.
            populate_for_write(state[key])
            state[key].add_(delta, alpha=scale * spec.weight)
            record.modules.append({"module": module, "rank": rank, "scale": scale * spec.weight})
            done += 1
            progress(done, total)
        records.append(record)
        if tied_embeddings and "lm_head.weight" in state:
            # A saved lm_head in a tied model: PEFT's merged model then has its own head, so untie.
            checkpoint.config = dataclasses.replace(checkpoint.config, tie_word_embeddings=False)
            tied_embeddings = False
            record.notes.append("lm_head replaced by the adapter: embeddings untied")
        if after_each is not None:
            after_each(len(records) - 1)
    return records


# Phi-3's fused projections -> the canonical modules they hold, in row order of the fused weight.
FUSED_MODULES = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


@dataclass
class LoraPairs:
    """One adapter kept apart from the base (runtime LoRA): canonical module -> (A [r, in], B [out, r])
    with PEFT's scale and the adapter's weight folded into B, so that the module computes W x + B (A x)."""

    name: str
    path: str
    weight: float
    sha256: dict[str, str]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def ranks(self) -> dict[str, int]:
        return {m: int(a.shape[0]) for m, (a, _) in self.modules.items()}

    def delta(self, module: str) -> torch.Tensor:
        a, b = self.modules[module]
        return b @ a

    def tensor_stats(self) -> dict:
        """Parameters of its pairs and their bytes in fp32."""
        count = sum(a.numel() + b.numel() for a, b in self.modules.values())
        return {"parameters": count, "tensor_bytes": 4 * count}

    def describe(self) -> dict:
        ranks = sorted(set(self.ranks().values()))
        projections = sorted({m.rsplit(".", 1)[-1] for m in self.modules})
        return {"name": self.name, "path": self.path, "weight": self.weight, "sha256": self.sha256,
                "ranks": ranks, "targets": projections, "modules": len(self.modules)}


def read_lora_pairs(checkpoint: Checkpoint, spec: AdapterSpec) -> LoraPairs:
    """The adapter's LoRA pairs on canonical module names, checked against the base, for runtime LoRA.

    What runtime LoRA cannot carry (embedding LoRA, replaced modules, lm_head) is refused with one line."""
    config, tensors, hashes = _read_adapter(spec)
    weights_path = spec.path / ADAPTER_WEIGHTS
    state = checkpoint.state
    _check_targets(config, _module_names(state), spec.path / "adapter_config.json")
    pairs, replacements = _group(tensors, weights_path)
    if replacements:
        raise UsageError(f"{weights_path}: the adapter replaces whole modules ({sorted(replacements)[0]}, ...: "
                         "modules_to_save); runtime LoRA carries LoRA pairs only, use --lora merge")
    use_rslora = bool(config.get("use_rslora"))
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, parts in sorted(pairs.items()):
        if parts["embedding"] or module == "lm_head":
            raise UsageError(f"{weights_path}: LoRA on '{module}' is not carried by runtime LoRA (linear layers of "
                             "the decoder only); use --lora merge")
        key = module + ".weight"
        if key not in state:
            raise UsageError(f"{weights_path}: target module '{module}' is absent from the base model; "
                             "was the adapter made for another base?")
        a, b, _, scale = _checked_pair(module, parts, config, state[key], weights_path, use_rslora)
        b = b * (scale * spec.weight)
        prefix, _, tail = module.partition(".self_attn.") if ".self_attn." in module else module.partition(".mlp.")
        fused = ("self_attn." if ".self_attn." in module else "mlp.") + tail
        if fused in FUSED_MODULES:
            # A fused projection's pair is one pair per part: A shared, B's rows split as the weight's are.
            sizes = _fused_sizes(checkpoint.config, fused)
            for part, b_part in zip(FUSED_MODULES[fused], torch.split(b, sizes, dim=0)):
                modules[f"{prefix}.{part}"] = (a, b_part.contiguous())
        else:
            modules[module] = (a, b)
    return LoraPairs(spec.runtime_name, str(spec.path), spec.weight, hashes, modules)


def _fused_sizes(cfg, fused: str) -> list[int]:
    if fused == "mlp.gate_up_proj":
        return [cfg.intermediate_size, cfg.intermediate_size]
    return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
