"""The one list of runtimes: which runs each artifact format of a bundle, and what travels to a device.

The build's validation, `edgec bench` and `edgec validate`, the CLI's choices and the ssh device all ask
here; a new runtime is a module in runtimes/ (a `Runtime` subclass with a bench agent `main`) and one entry.
Standard library only: this file travels with the bench agent.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeEntry:
    format: str  # the artifact's "format" in a bundle's manifest
    name: str  # the runtime's name in results and messages (its class's `name`)
    module: str  # runtimes.<module>: the runtime class and its bench agent (`python -m runtimes.<module>`)
    class_name: str
    packages: tuple  # what the device's Python must import to run it
    companions: tuple = ()  # other files of runtimes/ the module needs, pushed to a device with it

    def load(self):
        """The runtime class (imports its module, and so the runtime's own packages)."""
        return getattr(importlib.import_module(f"runtimes.{self.module}"), self.class_name)


RUNTIMES = {
    "onnx": RuntimeEntry("onnx", "onnxruntime", "ort", "OrtRuntime", ("onnxruntime", "numpy")),
    "pte": RuntimeEntry("pte", "executorch", "executorch", "ExecutorchRuntime", ("executorch", "torch", "numpy"),
                        ("executorch_kernels.py", "executorch_kernels.cpp")),
}
# What every bench agent needs beside its runtime's module, pushed to a device as the `runtimes` package.
AGENT_MODULES = ("__init__", "base", "registry", "validation", "agent")


def device_files(module: str) -> list[str]:
    """The files of runtimes/ a device receives to run `python -m runtimes.<module>`'s bench agent."""
    companions = next((e.companions for e in RUNTIMES.values() if e.module == module), ())
    return [f"{m}.py" for m in (*AGENT_MODULES, module)] + list(companions)


def runtime_for(fmt: str) -> RuntimeEntry:
    try:
        return RUNTIMES[fmt]
    except KeyError:
        raise ValueError(f"no runtime runs the {fmt!r} format (runtimes: {', '.join(RUNTIMES)})") from None


def open_runtime(bundle_dir, artifact: dict, threads: int = 0, adapter=None):
    """The runtime for one artifact of a bundle (a manifest entry), loaded and ready to run, with the runtime
    LoRA adapter of that name active (None: the base alone)."""
    from pathlib import Path

    runtime = runtime_for(artifact["format"]).load()(bundle_dir, Path(bundle_dir) / artifact["path"], threads=threads)
    runtime.set_adapter(adapter)
    return runtime
