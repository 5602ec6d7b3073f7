"""The one-layer trace made in a process of its own, while the build loads, merges and calibrates.

The trace depends on the decoder's configuration, not on its weights (trace_cache.py), so it need not wait
for them: a child process builds a one-layer decoder of the same configuration with random weights,
traces it and stores the trace in the trace cache, and the build's export, when it comes, waits for the
child and loads the stored trace with its own weights bound.

The child runs only where a CPU is left over by the build's torch threads (EDGEC_TRACE_AHEAD=1 starts it
without one, 0 never; the view's size and a memory budget are checked either way): without one it takes
its cycles from the build's OpenMP team, and giving the build one thread fewer while it runs would change
GPTQ's float sums, and so a rebuild's bytes. Whenever the child's work cannot be used (another key, a
failure, a trace that cannot be stored), the export traces itself.

    python -m compiler.onnx.trace_ahead CONFIG.pickle CACHE_DIR OPTIONS_JSON KEY
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_VIEW_MB = 512  # a larger embedding (a 1B model's 128k vocabulary) costs more memory beside the build
TRACER_OVERHEAD_MB = 450  # the child's torch, exporter and trace besides the view (135M: 541 MB in all)
WAIT_LIMIT_S = 600  # a hang guard: the trace takes seconds once the build waits and leaves it the CPUs


def _decoder(cfg, device: str):
    import torch

    from compiler.models.decoder import CanonicalDecoder
    from compiler.onnx.export import one_layer_config

    with torch.device(device):
        return CanonicalDecoder(one_layer_config(cfg)).eval()


class TraceAhead:
    """A child process tracing cfg's one-layer view under `key`."""

    def __init__(self, process: subprocess.Popen, key: str, config_file: Path, log_file: Path):
        self.process, self.key, self._config_file, self._log_file = process, key, config_file, log_file
        self.waited_s = 0.0  # how long the export waited for the child
        self.peak_rss_mb: float | None = None  # the child's, as it reports it

    def wait(self) -> bool:
        """Wait for the child; True when it stored its trace."""
        started = time.perf_counter()
        try:
            output, _ = self.process.communicate(timeout=WAIT_LIMIT_S)
            code = self.process.returncode
            with contextlib.suppress(ValueError, IndexError):
                self.peak_rss_mb = round(float(output.decode().split()[-1]), 1)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            code = "timeout"
        self.waited_s = time.perf_counter() - started
        if code != 0:
            detail = self._log_file.read_text(errors="replace").strip() if self._log_file.exists() else ""
            logging.getLogger("edgec").info("the trace made ahead was not stored (exit %s): %s", code,
                                            detail.splitlines()[-1] if detail else "no message")
        self._remove_files()
        return code == 0

    def close(self) -> None:
        """Stop the child if it still runs (the build failed or took another way)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
        self._remove_files()

    def _remove_files(self) -> None:
        self._config_file.unlink(missing_ok=True)
        self._log_file.unlink(missing_ok=True)


def usable_cpus() -> float:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's --cpus)."""
    usable = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            usable = min(usable, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return usable


def spare_cpu() -> bool:
    """A CPU this process may run on beyond the threads torch computes with (on a machine with two hardware
    threads a core, that can be the sibling of one of them: it slows the build's arithmetic a little, where
    taking a core from its OpenMP team would stall it)."""
    import torch

    return usable_cpus() >= torch.get_num_threads() + 1


def start(cfg, options: dict, cache_dir: Path | None, memory_headroom_mb: float | None) -> TraceAhead | None:
    """Start tracing cfg's one-layer view in a child process, or None: no cache, a trace already stored,
    layers that are not stamped from one, a graph the export writes without tracing (layer_graph.py), no
    spare CPU, or a view too large to hold beside the build (memory_headroom_mb: what the build's memory
    budget leaves, None without a budget)."""
    from compiler.onnx.export import one_layer_config, writes_layer
    from compiler.onnx.layer_graph import unsupported
    from compiler.onnx.trace_cache import trace_key

    if cache_dir is None or cfg.num_layers < 2 or len(set(cfg.layer_rope)) > 1:
        return None
    if writes_layer() and unsupported(one_layer_config(cfg)) is None:
        return None
    setting = os.environ.get("EDGEC_TRACE_AHEAD", "auto").lower()
    if setting in ("0", "off", "no", "false") or (setting == "auto" and not spare_cpu()):
        return None
    meta_view = _decoder(cfg, "meta")
    view_mb = sum(p.numel() for p in meta_view.parameters()) * 4 / 2**20  # tied tensors count once
    if view_mb > MAX_VIEW_MB or (memory_headroom_mb is not None
                                 and view_mb + TRACER_OVERHEAD_MB > memory_headroom_mb):
        return None
    key = trace_key(meta_view, options)  # names, shapes and dtypes only: the same as with weights
    if (cache_dir / f"{key}.onnx").is_file():
        return None
    files: list[Path] = []
    try:  # a speed-up only: whatever fails here leaves the export to trace, as without it
        handle, config_name = tempfile.mkstemp(prefix="edgec-trace-ahead-", suffix=".pickle")
        files.append(Path(config_name))
        with os.fdopen(handle, "wb") as f:
            pickle.dump(cfg, f)
        log_handle, log_name = tempfile.mkstemp(prefix="edgec-trace-ahead-", suffix=".log")
        files.append(Path(log_name))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "compiler.onnx.trace_ahead", config_name, str(cache_dir), json.dumps(options),
                 key], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_handle, env=env)
        finally:
            os.close(log_handle)
    except (OSError, pickle.PicklingError) as e:
        logging.getLogger("edgec").info("the trace is not made ahead: %s", e)
        for path in files:
            path.unlink(missing_ok=True)
        return None
    return TraceAhead(process, key, *files)


def random_view(cfg):
    """cfg's one-layer decoder with seeded random weights: every parameter distinct and none constant, so
    that trace_cache.store can tell each initializer's parameter by its values."""
    import torch

    generator = torch.Generator().manual_seed(0)
    view = _decoder(cfg, "cpu")
    with torch.no_grad():
        for param in view.parameters():
            param.normal_(generator=generator)
    return view


def main(argv: list[str]) -> int:
    config_file, cache_dir, options, key = argv
    if hasattr(os, "nice"):
        os.nice(19)  # where no CPU is spare (EDGEC_TRACE_AHEAD=1), the build's own stages come first
    import torch

    from compiler.onnx.export import trace_into_cache
    from compiler.onnx.trace_cache import trace_key

    from runtimes.base import peak_rss_mb

    torch.set_num_threads(1)
    with open(config_file, "rb") as f:
        cfg = pickle.load(f)
    Path(config_file).unlink(missing_ok=True)  # read: nothing is left behind if the build is killed now
    view = random_view(cfg)
    options = json.loads(options)
    if trace_key(view, options) != key:
        print("the view's key differs from the build's", file=sys.stderr)
        return 2
    stored = trace_into_cache(view, options["last_position_logits"], Path(cache_dir), key)
    print(peak_rss_mb())  # VmHWM: ru_maxrss would carry the parent's peak across exec
    return 0 if stored else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
