"""One adapter's LoRA pairs -> an onnxruntime adapter file (.onnx_adapter), fed by name to a graph whose
slots LoraSlotsPass made; onnxruntime (`LoraAdapter`, `RunOptions.add_active_adapter`) and
onnxruntime-genai (`Adapters.load`, `Generator.set_active_adapter`) read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compiler.frontend.lora import LoraPairs
from compiler.models.lora_slots import LoraSlots
from compiler.onnx.passes.lora_slots import IR_DTYPES, input_names
from runtimes.base import ADAPTER_DIR
ADAPTER_SUFFIX = ".onnx_adapter"


def adapter_path(name: str) -> str:
    """The adapter's file, relative to the bundle."""
    return f"{ADAPTER_DIR}/{name}{ADAPTER_SUFFIX}"


def write_onnx_adapter(path: Path, adapter: LoraPairs, slots: LoraSlots) -> dict:
    """Write the file; returns its parameter count and the bytes of its A/B tensors."""
    import onnxruntime as ort

    np_dtype = IR_DTYPES[slots.dtype][1]
    params, arrays = {}, []
    for module, (a, b) in adapter.modules.items():
        a_name, b_name = input_names(module)
        # PEFT's A [r, in] and B [out, r] -> the graph's x @ A [in, r] @ B [r, out].
        for name, tensor in ((a_name, a.T), (b_name, b.T)):
            array = np.ascontiguousarray(tensor.detach().numpy().astype(np_dtype))
            arrays.append(array)
            params[name] = ort.OrtValue.ortvalue_from_numpy(array)
    writer = ort.AdapterFormat()
    writer.set_adapter_version(1)
    writer.set_model_version(1)
    writer.set_parameters(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.export_adapter(str(path))
    return {"parameters": sum(a.size for a in arrays), "tensor_bytes": sum(a.nbytes for a in arrays)}
