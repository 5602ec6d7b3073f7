"""Run and benchmark an edgec .pte with ExecuTorch's runtime (Python bindings): greedy generation on the
program's own KV cache.

The program follows ExecuTorch's LLM runner conventions: `forward(tokens [1, seq], input_pos [1])` returns
the last position's logits and writes the chunk's keys and values into the cache at input_pos. The cache
is position-indexed, so running a chunk again from an earlier position simply overwrites what follows.
Needs numpy, torch and executorch only (`python -m runtimes.executorch BUNDLE` is the bench agent).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from runtimes import executorch_kernels
from runtimes.base import ADAPTER_DIR, Runtime, bench_agent_main, bundle_adapter_file

# Runtime LoRA: the all-zero adapter's name; the program needs some adapter's data, and this one is the base.
BASE_ADAPTER_NAME = "none"


# torchao (imported by executorch) logs a warning per optional GPU kernel library it cannot load, and
# torch one about its pytree registrations; neither concerns the user.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


@functools.cache
def load_op_libraries() -> None:
    """A program with the LLM custom ops or quantized kernels loads only after these registered them. Once a
    process: the custom ops also bring torch's MKL into ExecuTorch's threads (below). On x86-64, edgec's
    attention and copy kernels register ahead of the stock ones (runtimes/executorch_kernels.py)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401

    executorch_kernels.load()
    _keep_mkl_out_of_executorch_threads()


def _keep_mkl_out_of_executorch_threads() -> None:
    """ExecuTorch's custom_sdpa calls BLAS `sgemm_` from its threadpool's threads, and in a process with torch
    that symbol is torch's MKL, which opens an OpenMP region for every tiny decode matmul (torch turns MKL's
    dynamic thread choice off), which tripled the decode step (docs/measurements.md). The stock runner links
    ExecuTorch's own single-threaded BLAS, so MKL's default for threads other than torch's own is set to 1;
    torch's thread count is kept. x86 torch wheels only: elsewhere there is no MKL and nothing is done."""
    import torch

    try:
        mkl = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        set_global_threads = mkl.mkl_serv_set_num_threads
    except (OSError, AttributeError):
        return
    threads = torch.get_num_threads()
    set_global_threads(1)
    torch.set_num_threads(threads)  # the calling thread's own MKL setting, so torch's matmuls keep their threads


@contextlib.contextmanager
def _calling_thread_single_threaded():
    """The calling thread also runs custom_sdpa's work: its MKL calls single-threaded for the duration."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _read_data_file(path: Path):
    """A .ptd's tensors (an ExecuTorch DataPayload: buffers and named entries)."""
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    return FlatTensorSerializer().deserialize(Cord(path.read_bytes()))


def _merge_data_files(payloads: dict[Path, object], merged: Path) -> str:
    """One .ptd holding every named tensor of these (path -> its _read_data_file): ExecuTorch 1.5.1's Python
    bindings take a single data file (`data_path`), where its C++ Module takes a list (`data_files`) and
    looks names up in each."""
    from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    serializer = FlatTensorSerializer()
    buffers, named = [], {}
    for path, payload in payloads.items():
        for key, entry in payload.named_data.items():
            if key in named:
                raise ValueError(f"{path}: '{key}' is also in an earlier data file")
            named[key] = DataEntry(len(buffers) + entry.buffer_index, 16, entry.tensor_layout)
        buffers.extend(payload.buffers)
    with merged.open("wb") as f:
        serializer.serialize(DataPayload(buffers=buffers, named_data=named)).write_to_file(f)
    return str(merged)


class ExecutorchRuntime(Runtime):
    name = "executorch"
    format = "pte"

    def __init__(self, bundle_dir: str | Path, artifact_path: str | Path | None = None, threads: int = 0):
        """Program-data separation: the program reads its weights from the foundation data file(s) the
        manifest lists (`data_files`; during a build, `model.ptd` beside the program) and, with runtime LoRA,
        its LoRA tensors from one adapter's .ptd (the all-zero `base_adapter` when none is active)."""
        import torch
        from executorch import version as et_version

        load_op_libraries()
        self.torch = torch
        self.bundle_dir = Path(bundle_dir)
        manifest_path = self.bundle_dir / "manifest.json"
        self.manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        self.artifact = next((a for a in self.manifest["artifacts"] if a["format"] == "pte"), {}) if self.manifest else {}
        if artifact_path is None:
            artifact_path = self.bundle_dir / self.artifact["path"]
        self.program_path = Path(artifact_path)
        beside = self.program_path.with_suffix(".ptd")
        self.foundation = ([self.bundle_dir / f for f in self.artifact["data_files"]] if "data_files" in self.artifact
                           else [beside] if beside.exists() else [])
        lora = self.artifact.get("lora") or {}
        base_adapter = self.bundle_dir / lora.get("base_adapter", f"{ADAPTER_DIR}/{BASE_ADAPTER_NAME}.ptd")
        self.base_adapter = base_adapter if base_adapter.exists() else None
        self.adapter_file = None
        # Data files parsed once: an adapter switch then reads only the adapter's file, not the foundation
        # again (the whole model's weights). Held as bytes for the runtime's life, a foundation's size.
        self._parsed_data: dict[Path, object] = {}
        self._load(self.base_adapter)
        self.version = getattr(et_version, "__version__", "unknown")
        self.max_seq_len = self.max_positions = self.metadata("get_max_seq_len")
        self.vocab_size = self.metadata("get_vocab_size")
        self.eos_ids = tuple(self.program.load_method("get_eos_ids").execute([])) \
            if "get_eos_ids" in self.program.method_names else ()
        # The position input is [1] (the chunk's start, as edgec and ExecuTorch's llama export write it) or
        # [seq] (one per token, as optimum-executorch's cache_position): the program's signature says which.
        position_sizes = self.method.metadata.input_tensor_meta(1).sizes()
        self.per_token_positions = not (len(position_sizes) == 1 and position_sizes[0] == 1)
        self.threads = threads
        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)

    def _load(self, adapter_file: Path | None) -> None:
        """(Re)load the program over the foundation and this adapter file: the Python bindings take one data
        file, so more than one are merged into a temporary file that lives as long as the program."""
        from executorch.runtime import Runtime as EtRuntime

        started = time.perf_counter()
        self.data_files = self.foundation + ([adapter_file] if adapter_file else [])
        data_path = str(self.data_files[0]) if self.data_files else None
        if len(self.data_files) > 1:
            import tempfile

            self._merged_dir = tempfile.TemporaryDirectory(prefix="edgec-ptd-")
            for path in self.data_files:
                if path not in self._parsed_data:
                    self._parsed_data[path] = _read_data_file(path)
            data_path = _merge_data_files({p: self._parsed_data[p] for p in self.data_files},
                                          Path(self._merged_dir.name) / "merged.ptd")
        self.program = EtRuntime.get().load_program(self.program_path, data_path=data_path)
        self.method = self.program.load_method("forward")
        self.adapter_file = adapter_file
        self.load_s = time.perf_counter() - started

    def set_adapter(self, name: str | None, file: str | Path | None = None) -> None:
        """Activate a runtime LoRA adapter (its .ptd beside the foundation; None: the all-zero one, the base):
        the program is loaded again over the new data."""
        if name is not None and file is None:
            file = bundle_adapter_file(self.bundle_dir, self.manifest, self.format, name)
        if name is not None and self.base_adapter is None:
            raise ValueError(f"adapter {name}: {self.program_path} has no runtime LoRA slots")
        target = Path(file) if name is not None else self.base_adapter
        if target != self.adapter_file:
            self._load(target)
        self.adapter = name

    def metadata(self, name: str):
        return self.program.load_method(name).execute([])[0]

    def _run(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Last-position logits [vocab] of the chunk ids [1, seq] written at `start` (a program returning
        every position's logits gives its last row)."""
        torch, seq = self.torch, ids.shape[1]
        if start + seq > self.max_seq_len:
            raise ValueError(f"{start + seq} positions exceed the program's max_seq_len {self.max_seq_len}")
        positions = torch.arange(start, start + seq) if self.per_token_positions else torch.tensor([start])
        with _calling_thread_single_threaded():
            logits = self.method.execute([torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)), positions])[0]
        return logits.numpy().reshape(-1, logits.shape[-1])[-1]

    # The validation interface shared with OrtRuntime: a "cache" here is just the next position.
    def empty_cache(self) -> int:
        return 0

    def forward(self, ids: np.ndarray, cache: int, start: int):
        """Logits for every position of the chunk [1, seq, vocab]: the last from one prefill of the whole
        chunk (the runner's path), the others from single-token steps (the decode path)."""
        rows = [self._run(ids[:, i : i + 1], start + i) for i in range(ids.shape[1] - 1)]
        rows.append(self._run(ids, start))
        return np.stack(rows)[None], start + ids.shape[1]

    def start_sequence(self, total_tokens: int):
        """The cache is position-indexed: a new sequence simply overwrites it from position 0."""
        return self._run

    def runtime_facts(self) -> dict:
        return {**super().runtime_facts(), "kv_cache": f"in-program, {self.max_seq_len} positions",
                "executorch_kernels": executorch_kernels.status()}


def main(argv: list[str] | None = None) -> int:
    return bench_agent_main(ExecutorchRuntime, argv)


if __name__ == "__main__":
    sys.exit(main())
