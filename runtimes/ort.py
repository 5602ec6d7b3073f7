"""Run and benchmark an edgec ONNX bundle with onnxruntime: greedy generation on the KV cache.

Needs only numpy, onnxruntime and the standard library, so it also runs as a bench agent in a fresh
process (`python -m runtimes.ort BUNDLE`), where peak RSS measures the artifact and not the compiler. On a
device it is pushed with runtimes.registry.AGENT_MODULES as a `runtimes` package.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from runtimes.base import Runtime, bench_agent_main, bundle_adapter_file


def _artifact(manifest: dict, fmt: str = "onnx") -> dict:
    for artifact in manifest.get("artifacts", []):
        if artifact.get("format") == fmt:
            return artifact
    raise ValueError(f"bundle has no {fmt} artifact")


def prompt_graph_path(model_path: Path) -> Path | None:
    """The graph genai_config.json's pipeline runs on prompts while model_path runs on generated tokens
    (an edgec build's --prompt-accuracy-level), or None."""
    config_path = model_path.parent / "genai_config.json"
    if not config_path.exists():
        return None
    stages = [stage for entry in json.loads(config_path.read_text())["model"]["decoder"].get("pipeline", [])
              for stage in entry.values()]
    if not any(s["filename"] == model_path.name and not s.get("run_on_prompt", True) for s in stages):
        return None
    return next((model_path.parent / s["filename"] for s in stages
                 if s.get("run_on_prompt", True) and not s.get("run_on_token_gen", True)), None)


class OrtRuntime(Runtime):
    """An onnxruntime session over a bundle's decoder, driven by the I/O description in the manifest."""

    name = "onnxruntime"
    format = "onnx"

    def __init__(self, bundle_dir: str | Path, artifact_path: str | Path | None = None, threads: int = 0):
        import onnxruntime as ort

        self.bundle_dir = Path(bundle_dir)
        manifest_path = self.bundle_dir / "manifest.json"
        self.manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        if artifact_path is None:
            artifact_path = self.bundle_dir / _artifact(self.manifest)["path"]
        self.model_path = Path(artifact_path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.prompt_path = prompt_graph_path(self.model_path)
        if self.prompt_path is not None:
            # Two sessions, two thread pools: one's threads spinning on past its run would hold the cores
            # the other's next run needs.
            options.add_session_config_entry("session.force_spinning_stop", "1")
        started = time.perf_counter()
        self.session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        self.prompt_session = self.session if self.prompt_path is None else ort.InferenceSession(
            str(self.prompt_path), options, providers=["CPUExecutionProvider"])
        self.load_s = time.perf_counter() - started
        self.version = ort.__version__
        self.threads = threads
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        logits_shape = self.session.get_outputs()[0].shape
        self.fixed_vocab = isinstance(logits_shape[-1], int)
        self.vocab_size = logits_shape[-1] if self.fixed_vocab else 1000
        self.last_position_logits = logits_shape[1] == 1  # the build's --logits last
        self.adapter_feeds = {}  # the active runtime LoRA adapter's parameters by input name
        self._loaded_adapters = {}

    def set_adapter(self, name: str | None, file: str | Path | None = None) -> None:
        """Activate a runtime LoRA adapter of the bundle (an .onnx_adapter file, read once and kept); `file`
        for one the manifest does not list yet (during a build). Its parameters are fed by name, as
        onnxruntime-genai feeds them: onnxruntime's RunOptions.add_active_adapter is ignored by
        run_with_iobinding (onnxruntime 1.32), which the shared-buffer KV cache needs."""
        import onnxruntime as ort

        if name is None:
            self.adapter, self.adapter_feeds = None, {}
            return
        if name not in self._loaded_adapters:
            if file is None:
                file = bundle_adapter_file(self.bundle_dir, self.manifest, self.format, name)
            self._loaded_adapters[name] = ort.AdapterFormat.read_adapter(str(file)).get_parameters()
        self.adapter, self.adapter_feeds = name, self._loaded_adapters[name]

    def _kv_dims(self) -> tuple[int, int]:
        """KV heads and head size; from genai_config.json for models whose cache dims are symbolic."""
        _, heads, _, head_dim = self.past_inputs[0].shape
        if isinstance(heads, int) and isinstance(head_dim, int):
            return heads, head_dim
        config = json.loads((self.model_path.parent / "genai_config.json").read_text())["model"]["decoder"]
        return config["num_key_value_heads"], config["head_size"]

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        heads, head_dim = self._kv_dims()
        return [np.zeros((batch, heads, 0, head_dim), dtype=np.float32) for _ in self.past_inputs]

    def _position_feeds(self, input_ids: np.ndarray, past_len: int) -> dict[str, np.ndarray]:
        batch, seq = input_ids.shape
        feeds = {"input_ids": input_ids.astype(np.int64, copy=False)}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((batch, past_len + seq), dtype=np.int64)
        if "position_ids" in self.input_names:  # models that derive positions from the mask have none
            feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
        return feeds

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray], past_len: int):
        """Logits at every position of `input_ids` [batch, seq] and the present cache after it. A model with
        last-position logits gives the last from one run over the whole chunk (the prefill path, whose
        present is returned) and the others from single-token steps on `past` (the decode path)."""
        if not self.last_position_logits or input_ids.shape[1] == 1:
            return self._run(input_ids, past, past_len)
        rows, cache = [], past
        for i in range(input_ids.shape[1] - 1):
            logits, cache = self._run(input_ids[:, i : i + 1], cache, past_len + i)
            rows.append(logits)
        logits, present = self._run(input_ids, past, past_len)
        return np.concatenate([*rows, logits], axis=1), present

    def _session_for(self, input_ids: np.ndarray):
        """The prompt graph's session for a run of several new tokens, as onnxruntime-genai picks it for batch 1."""
        return self.session if input_ids.shape[1] == 1 else self.prompt_session

    def _run(self, input_ids: np.ndarray, past: list[np.ndarray], past_len: int):
        """One session run over `input_ids` [batch, seq]; returns (logits, present)."""
        feeds = self._position_feeds(input_ids, past_len)
        for value, tensor in zip(self.past_inputs, past):
            feeds[value.name] = tensor
        outputs = self._session_for(input_ids).run(self.output_names, {**feeds, **self.adapter_feeds})
        return outputs[0], outputs[1:]

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """All-position logits of a prompt (one prefill pass, or as forward() gets them)."""
        logits, _ = self.forward(input_ids, self.empty_cache(input_ids.shape[0]), 0)
        return logits

    @property
    def shares_buffer(self) -> bool:
        """Whether past and present may be one buffer (GroupQueryAttention models), per the manifest."""
        if self.manifest is None:  # a model file outside a bundle, as during a build
            return False
        try:
            return bool(_artifact(self.manifest)["io"]["kv_cache"]["shares_buffer"])
        except (KeyError, ValueError):
            return False

    def _copying_step(self):
        """step(ids, past_len) -> last-position logits, feeding each step's present back as the next past."""
        cache = self.empty_cache()

        def step(ids: np.ndarray, past_len: int) -> np.ndarray:
            nonlocal cache
            logits, cache = self._run(ids, cache, past_len)
            return logits[0, -1]

        return step

    def _shared_buffer_step(self, total: int):
        """step(ids, past_len) -> last-position logits, with past and present bound to one preallocated
        buffer per layer (I/O binding), as onnxruntime-genai runs these models: each step writes one position.
        What stays the same from step to step (the KV buffers, the adapter's parameters) is bound once, and a
        one-position run's logits go to one buffer: binding is a call per name, 120 and more a step at 30
        layers, a few percent of a decode step."""
        import onnxruntime as ort

        heads, head_dim = self._kv_dims()
        buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, total, head_dim), np.float32))
                   for _ in self.past_inputs]
        presents = [name for name in self.output_names if name.startswith("present.")]
        # A one-position run's logits land in one buffer (a vocabulary the graph fixes); others are allocated.
        last_logits = np.zeros((1, 1, self.vocab_size), np.float32)
        last_logits_value = ort.OrtValue.ortvalue_from_numpy(last_logits)
        bindings = {}  # session -> [its binding, the adapter parameters bound there]

        def binding_for(session):
            if session not in bindings:
                binding = session.io_binding()
                binding.bind_output("logits")  # first: get_outputs() follows the binding order
                for name, buffer in zip(presents, buffers):
                    binding.bind_ortvalue_output(name, buffer)
                bindings[session] = [binding, None]
            binding, adapter = bindings[session]
            if adapter is not self.adapter_feeds:  # a new sequence's adapter, or none now
                binding.clear_binding_inputs()
                for value, buffer in zip(self.past_inputs, buffers):
                    binding.bind_ortvalue_input(value.name, buffer)
                for name, value in self.adapter_feeds.items():
                    binding.bind_ortvalue_input(name, value)
                bindings[session][1] = self.adapter_feeds
            return binding

        def step(ids: np.ndarray, past_len: int) -> np.ndarray:
            session = self._session_for(ids)
            binding = binding_for(session)
            in_buffer = self.fixed_vocab and (ids.shape[1] == 1 or self.last_position_logits)
            if in_buffer:
                binding.bind_ortvalue_output("logits", last_logits_value)
            else:
                # Anew each run: an output onnxruntime allocated stays bound as a buffer of its shape.
                binding.bind_output("logits")
            for name, array in self._position_feeds(ids, past_len).items():
                binding.bind_cpu_input(name, np.ascontiguousarray(array))  # replaces the last step's
            session.run_with_iobinding(binding)
            if in_buffer:
                return last_logits[0, -1].copy()
            return binding.get_outputs()[0].numpy()[0, -1].copy()

        return step

    def start_sequence(self, total_tokens: int, shared_buffer: bool | None = None):
        """shared_buffer: one KV buffer for past and present (None: as the manifest says the model allows)."""
        shared = self.shares_buffer if shared_buffer is None else shared_buffer
        return self._shared_buffer_step(total_tokens) if shared else self._copying_step()

    def runtime_facts(self) -> dict:
        facts = {**super().runtime_facts(),
                 "kv_cache": "shared buffer" if self.shares_buffer else "past/present copies"}
        if self.prompt_path is not None:
            facts["prompt_graph"] = self.prompt_path.name
        return facts


def main(argv: list[str] | None = None) -> int:
    return bench_agent_main(OrtRuntime, argv)


if __name__ == "__main__":
    sys.exit(main())
