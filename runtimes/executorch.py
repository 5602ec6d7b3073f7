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

from runtimes.base import Runtime, bench_agent_main


# torchao (imported by executorch) logs a warning per optional GPU kernel library it cannot load, and
# torch one about its pytree registrations; neither concerns the user.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


@functools.cache
def load_op_libraries() -> None:
    """A program with the LLM custom ops or quantized kernels loads only after these registered them. Once a
    process: the custom ops also bring torch's MKL into ExecuTorch's threads (below)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401

    _keep_mkl_out_of_executorch_threads()


def _keep_mkl_out_of_executorch_threads() -> None:
    """ExecuTorch's custom_sdpa calls BLAS `sgemm_` from its threadpool's threads, and in a process with torch
    that symbol is torch's MKL, which opens an OpenMP region for every tiny decode matmul (torch turns MKL's
    dynamic thread choice off), which tripled the decode step (README). The stock runner links
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


class ExecutorchRuntime(Runtime):
    name = "executorch"
    format = "pte"

    def __init__(self, bundle_dir: str | Path, artifact_path: str | Path | None = None, threads: int = 0):
        import torch
        from executorch import version as et_version
        from executorch.runtime import Runtime as EtRuntime

        load_op_libraries()
        self.torch = torch
        self.bundle_dir = Path(bundle_dir)
        manifest_path = self.bundle_dir / "manifest.json"
        self.manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        if artifact_path is None:
            artifact_path = self.bundle_dir / next(a["path"] for a in self.manifest["artifacts"] if a["format"] == "pte")
        self.program_path = Path(artifact_path)
        started = time.perf_counter()
        self.program = EtRuntime.get().load_program(self.program_path)
        self.method = self.program.load_method("forward")
        self.load_s = time.perf_counter() - started
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
        return {**super().runtime_facts(), "kv_cache": f"in-program, {self.max_seq_len} positions"}


def main(argv: list[str] | None = None) -> int:
    return bench_agent_main(ExecutorchRuntime, argv)


if __name__ == "__main__":
    sys.exit(main())
