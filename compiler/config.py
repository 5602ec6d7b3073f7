"""The build configuration: nested dataclasses, serialisable to and from a versioned dict.

The CLI only fills this in; every stage reads the part it needs.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compiler.errors import UsageError
from compiler.frontend.lora import AdapterSpec

CONFIG_VERSION = 1


def default_cache_dir() -> Path:
    """Where edgec keeps what is slow to make (the demo's model, the emulated device's root)."""
    return Path(os.environ.get("EDGEC_CACHE", Path.home() / ".cache" / "edgec"))


def cache_setting(variable: str, name: str) -> Path | None:
    """A cache's directory from its environment variable: a directory, or 0 (off, no, false) for none; unset:
    `name` under default_cache_dir()."""
    setting = os.environ.get(variable, "")
    if setting.lower() in ("0", "off", "no", "false"):
        return None
    return Path(setting) if setting else default_cache_dir() / name


FORMATS = ("onnx", "pte")
PRECISIONS = ("fp32", "int4")
QUANT_ALGOS = ("rtn", "clip", "gptq")

# Gate name -> (direction, limit). "max": the metric must be at most the limit; "min": at least.
DEFAULT_GATES: dict[str, dict[str, tuple[str, float]]] = {
    "fp32": {
        "max_abs_logits": ("max", 1e-3),
        "rel_l2_logits": ("max", 1e-4),
        "top1_agreement": ("min", 0.99),
        "kl_mean": ("max", 1e-5),
        "greedy_match": ("min", 1.0),
        "genai_greedy_match": ("min", 1.0),  # runtime LoRA: onnxruntime-genai through its Adapters API
        "perplexity_ratio": ("max", 1.001),
        "lora_delta_retention": ("min", 0.99),
    },
    # Against the fp32 reference: an int4 model is close in distribution, not bit-equal.
    "int4": {
        "kl_mean": ("max", 0.1),
        "top1_agreement": ("min", 0.8),
        "perplexity_ratio": ("max", 1.25),
        "lora_delta_retention": ("min", 0.7),
    },
}


@dataclass
class ModelConfig:
    path: Path


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of the ONNX model (MatMulNBits / GatherBlockQuantized)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # onnxruntime: 4 = int8 activations in the kernel, 0/1 = fp32
    algo: str = "gptq"
    embedding_bits: int = 4  # 0 keeps the embedding fp32
    lm_head_bits: int = 4
    keep_fp32: tuple[str, ...] = ()  # module-path regexes
    keep_int8: tuple[str, ...] = ()
    calibration: str | None = None  # text file for gptq; None: a small built-in text
    max_kl: float | None = None  # --quant auto: the KL to fp32 on calibration text the plan must meet
    plan: tuple[tuple[str, int, int], ...] = ()  # --quant auto's choice: (module path, bits, block), bits 0 = fp32
    smoothing: float = 0.5  # gptq: alpha of the channel smoothing (compiler/quant/smooth.py); 0 = none
    prompt_accuracy_level: int | None = None  # onnx: a second graph for prompts at this level (prompt_graph.py)

    def __post_init__(self):
        if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise UsageError(f"--block-size {self.block_size}: must be a power of two from 16 to 256")
        if self.algo not in QUANT_ALGOS:
            raise UsageError(f"--algo {self.algo}: unknown (supported: {', '.join(QUANT_ALGOS)})")
        for name, bits in (("--embedding-bits", self.embedding_bits), ("--lm-head-bits", self.lm_head_bits)):
            if bits not in (0, 4, 8):
                raise UsageError(f"{name} {bits}: must be 0 (fp32), 4 or 8")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise UsageError(f"--calibration {self.calibration}: file not found; pass a UTF-8 text file")
        if self.max_kl is not None and not (0 < self.max_kl < float("inf")):
            raise UsageError(f"--max-kl {self.max_kl}: must be a KL divergence above 0, e.g. 0.1")
        if not 0 <= self.smoothing <= 1:
            raise UsageError(f"--smoothing {self.smoothing}: must be from 0 (none) to 1")
        if self.prompt_accuracy_level is not None and self.prompt_accuracy_level not in range(5):
            raise UsageError(f"--prompt-accuracy-level {self.prompt_accuracy_level}: must be 0 to 4 (1: fp32)")
        # onnxruntime computes an fp32 graph's MatMulNBits with int8 activations at level 4, in fp32 at any other.
        if self.prompt_accuracy_level is not None and (self.prompt_accuracy_level == 4) == (self.accuracy_level == 4):
            raise UsageError(f"--prompt-accuracy-level {self.prompt_accuracy_level}: computes as --accuracy-level "
                             f"{self.accuracy_level} does (level 4: int8 activations, any other: fp32), so the prompt "
                             "graph would only cost memory; use 4 for one of the two and 1 for the other")
        if self.max_kl is not None and not self.symmetric:
            raise UsageError("--quant auto plans symmetric blocks only; drop --asymmetric")
        for path, bits, block in self.plan:
            if bits not in (0, 4, 8) or (bits and (block < 16 or block > 256 or block & (block - 1))):
                raise UsageError(f"quant plan entry {path}: {bits} bits, block {block} is not a supported choice")
        for pattern in self.keep_fp32 + self.keep_int8:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UsageError(f"--keep-fp32/--keep-int8 '{pattern}': not a valid regex ({e})") from None

    def bits_for(self, module_path: str, default: int) -> int:
        """Bits for the module at this torch module path: the auto plan's, --keep-fp32, --keep-int8, else `default`."""
        for path, bits, _ in self.plan:
            if path == module_path:
                return bits
        if any(re.search(p, module_path) for p in self.keep_fp32):
            return 0
        if any(re.search(p, module_path) for p in self.keep_int8):
            return 8
        return default

    def block_for(self, module_path: str) -> int:
        """The block of the module at this path: the auto plan's, else --block-size."""
        return next((block for path, bits, block in self.plan if path == module_path and bits), self.block_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_fp32"], d["keep_int8"] = list(self.keep_fp32), list(self.keep_int8)
        d["plan"] = [list(entry) for entry in self.plan]
        return d


@dataclass
class ExportConfig:
    formats: tuple[str, ...] = ("onnx",)
    optimize: str = "fuse"  # ONNX pass pipeline: none | fuse
    dump_dir: Path | None = None
    quant: QuantConfig | None = None
    max_seq_len: int | None = None  # pte: positions of the in-program KV cache (None: min(model's, 2048))
    threads: int = 0  # onnx: onnxruntime-genai's intra-op threads in genai_config.json (0: genai's default)
    logits: str = "last"  # onnx: "last" (the lm_head on the last position only) or "all" positions

    @property
    def last_position_logits(self) -> bool:
        return self.logits == "last"

    @property
    def precision(self) -> str:
        """What the validation gates hold the artifact to: the weights' precision."""
        return "int4" if self.quant else "fp32"

    @property
    def pipeline(self) -> str:
        """The named ONNX pass pipeline: none, fuse, fuse+int4 or int4."""
        parts = [self.optimize] if self.optimize != "none" else []
        parts += ["int4"] if self.quant else []
        return "+".join(parts) or "none"


@dataclass
class ValidationConfig:
    enabled: bool = True
    new_tokens: int = 16
    gate_overrides: dict[str, float] = field(default_factory=dict)

    def gates(self, precision: str) -> dict[str, tuple[str, float]]:
        gates = dict(DEFAULT_GATES[precision])
        for name, limit in self.gate_overrides.items():
            if name not in gates:
                raise UsageError(f"--gate {name}: unknown metric (known: {', '.join(gates)})")
            gates[name] = (gates[name][0], limit)
        return gates


LORA_MODES = ("merge", "runtime")


@dataclass
class LoraConfig:
    """merge: adapters merged into the weights (one model); runtime: the base once, LoRA slots, one file
    per adapter (dtype None: fp32 for an fp32 build, fp16 for a quantized one)."""

    mode: str = "merge"
    dtype: str | None = None
    max_rank: int | None = None
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in LORA_MODES:
            raise UsageError(f"--lora {self.mode}: unknown (supported: {', '.join(LORA_MODES)})")
        if self.mode == "merge" and (self.dtype or self.max_rank or self.targets):
            raise UsageError("--lora-dtype/--lora-max-rank/--lora-targets need --lora runtime")

    def slot_dtype(self, quantized: bool) -> str:
        return self.dtype or ("fp16" if quantized else "fp32")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "dtype": self.dtype, "max_rank": self.max_rank, "targets": list(self.targets)}


@dataclass
class BuildConfig:
    model: ModelConfig
    out: Path
    adapters: list[AdapterSpec] = field(default_factory=list)
    export: ExportConfig = field(default_factory=ExportConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    force: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    memory_budget_mb: float | None = None  # --memory-budget: the build plans to fit it or refuses at the start

    def __post_init__(self):
        level = self.export.quant.prompt_accuracy_level if self.export.quant else None
        if level is not None and "onnx" not in self.export.formats:
            raise UsageError(f"--prompt-accuracy-level {level}: an ONNX graph option; add --format onnx or drop it")
        if level is not None and self.lora.mode == "runtime":
            # genai activates an adapter on the generator's run options, which a pipeline's stages do not use.
            raise UsageError(f"--prompt-accuracy-level {level}: not with --lora runtime (onnxruntime-genai would run "
                             "a two-graph bundle without the active adapter); drop one of them")

    def to_dict(self) -> dict:
        return {
            "version": CONFIG_VERSION,
            "model": {"path": str(self.model.path)},
            "adapters": [a.to_dict() for a in self.adapters],
            "export": {"formats": list(self.export.formats), "precision": self.export.precision,
                       "optimize": self.export.optimize, "max_seq_len": self.export.max_seq_len,
                       "threads": self.export.threads, "logits": self.export.logits,
                       "quant": self.export.quant.to_dict() if self.export.quant else None},
            "validation": asdict(self.validation),
            "lora": self.lora.to_dict(),
            "memory_budget_mb": self.memory_budget_mb,
        }

    @classmethod
    def from_dict(cls, data: dict, out: Path) -> "BuildConfig":
        if data.get("version") != CONFIG_VERSION:
            raise UsageError(f"build config version {data.get('version')} is not supported (expected {CONFIG_VERSION})")
        return cls(
            model=ModelConfig(Path(data["model"]["path"])),
            out=out,
            adapters=[AdapterSpec(Path(a["path"]), float(a["weight"]), a.get("name")) for a in data.get("adapters", [])],
            export=ExportConfig(tuple(data["export"]["formats"]), data["export"].get("optimize", "none"), None,
                                _quant_from_dict(data["export"].get("quant")), data["export"].get("max_seq_len"),
                                data["export"].get("threads", 0), data["export"].get("logits", "all")),
            validation=ValidationConfig(**data.get("validation", {})),
            lora=LoraConfig(**{**data.get("lora", {}), "targets": tuple(data.get("lora", {}).get("targets", ()))}),
            memory_budget_mb=data.get("memory_budget_mb"),
        )


def _quant_from_dict(data: dict | None) -> QuantConfig | None:
    if not data:
        return None
    data = dict(data)
    data["keep_fp32"], data["keep_int8"] = tuple(data.get("keep_fp32", ())), tuple(data.get("keep_int8", ()))
    data["plan"] = tuple(tuple(entry) for entry in data.get("plan", ()))
    data.setdefault("smoothing", 0.0)  # bundles built before it had none
    return QuantConfig(**data)
