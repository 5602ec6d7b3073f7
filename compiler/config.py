"""The build configuration: nested dataclasses, serialisable to and from a versioned dict.

The CLI only fills this in; every stage reads the part it needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from compiler.errors import UsageError
from compiler.frontend.lora import AdapterSpec

CONFIG_VERSION = 1
FORMATS = ("onnx",)
PRECISIONS = ("fp32",)

# Gate name -> (direction, limit). "max": the metric must be at most the limit; "min": at least.
DEFAULT_GATES: dict[str, dict[str, tuple[str, float]]] = {
    "fp32": {
        "max_abs_logits": ("max", 1e-3),
        "rel_l2_logits": ("max", 1e-4),
        "top1_agreement": ("min", 0.99),
        "kl_mean": ("max", 1e-5),
        "greedy_match": ("min", 1.0),
    }
}


@dataclass
class ModelConfig:
    path: Path


@dataclass
class ExportConfig:
    formats: tuple[str, ...] = ("onnx",)
    precision: str = "fp32"
    optimize: str = "fuse"  # ONNX pass pipeline: none | fuse
    dump_dir: Path | None = None


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


@dataclass
class BuildConfig:
    model: ModelConfig
    out: Path
    adapters: list[AdapterSpec] = field(default_factory=list)
    export: ExportConfig = field(default_factory=ExportConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    force: bool = False

    def to_dict(self) -> dict:
        return {
            "version": CONFIG_VERSION,
            "model": {"path": str(self.model.path)},
            "adapters": [a.to_dict() for a in self.adapters],
            "export": {"formats": list(self.export.formats), "precision": self.export.precision,
                       "optimize": self.export.optimize},
            "validation": asdict(self.validation),
        }

    @classmethod
    def from_dict(cls, data: dict, out: Path) -> "BuildConfig":
        if data.get("version") != CONFIG_VERSION:
            raise UsageError(f"build config version {data.get('version')} is not supported (expected {CONFIG_VERSION})")
        return cls(
            model=ModelConfig(Path(data["model"]["path"])),
            out=out,
            adapters=[AdapterSpec(Path(a["path"]), float(a["weight"])) for a in data.get("adapters", [])],
            export=ExportConfig(tuple(data["export"]["formats"]), data["export"]["precision"],
                                data["export"].get("optimize", "none")),
            validation=ValidationConfig(**data.get("validation", {})),
        )
