"""Run a bundle with onnxruntime-genai's own generator, the way apps built on it run it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from runtimes.base import bundle_adapter_file


class GenaiRuntime:
    """Greedy generation through onnxruntime-genai (reads the bundle's genai_config.json)."""

    name = "onnxruntime-genai"

    def __init__(self, bundle_dir: str | Path, adapter: str | None = None, adapter_file: str | Path | None = None,
                 threads: int = 0):
        """threads: intra-op threads instead of what genai_config.json says (0: as it says)."""
        import onnxruntime_genai as og

        self._og = og
        self.bundle_dir = Path(bundle_dir)
        config = og.Config(str(bundle_dir))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.adapters = None  # og.Adapters, made when the first adapter is loaded
        self._loaded: set[str] = set()
        self.adapter = None
        self.set_adapter(adapter, adapter_file)

    def load_adapter(self, name: str, file: str | Path | None = None) -> None:
        """Load one of the bundle's runtime LoRA adapters into genai's Adapters (once); `file` for one the
        manifest does not list yet (during a build)."""
        if name in self._loaded:
            return
        if file is None:
            manifest_path = self.bundle_dir / "manifest.json"
            manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
            file = bundle_adapter_file(self.bundle_dir, manifest, "onnx", name)
        if self.adapters is None:
            self.adapters = self._og.Adapters(self.model)
        self.adapters.load(str(file), name)
        self._loaded.add(name)

    def set_adapter(self, name: str | None, file: str | Path | None = None) -> None:
        """The adapter each later generation activates (None: the base alone)."""
        if name is not None:
            self.load_adapter(name, file)
        self.adapter = name

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._og.Tokenizer(self.model).encode(text)]

    def generate(self, prompt: list[int], new_tokens: int, stop_at_eos: bool = True,
                 timings: list | None = None) -> list[int]:
        """The new tokens; stop_at_eos=False always makes new_tokens of them. timings, if given, receives
        (prompt processing seconds, decode seconds for the tokens generated)."""
        total = len(prompt) + new_tokens
        options = {"max_length": total, "do_sample": False}
        if not stop_at_eos:
            options["min_length"] = total
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(**options)
        generator = self._og.Generator(self.model, params)
        if self.adapter is not None:
            generator.set_active_adapter(self.adapters, self.adapter)
        started = time.perf_counter()
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        prefill = time.perf_counter() - started
        tokens: list[int] = []
        started = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        if timings is not None:
            timings[:] = [prefill, time.perf_counter() - started]
        return tokens
