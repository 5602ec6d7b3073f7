"""edgec: compile Hugging Face causal LMs with LoRA adapters into on-device artifacts."""

__version__ = "0.1.0"
