"""Run a bundle with onnxruntime-genai's own generator, the way apps built on it run it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


class GenaiRuntime:
    """Greedy generation through onnxruntime-genai (reads the bundle's genai_config.json)."""

    name = "onnxruntime-genai"

    def __init__(self, bundle_dir: str | Path):
        import onnxruntime_genai as og

        self._og = og
        self.model = og.Model(str(bundle_dir))

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
