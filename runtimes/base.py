"""What every runtime shares: the Runtime interface with its one greedy loop and benchmark, the benchmark
spec and result schema, and the device facts.

Standard library only at import (Python 3.8+): this file travels with the on-device bench agent, whose
probe runs before numpy or a runtime is known to be there.
"""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_SCHEMA = "edgec.bench/1"
# A context put in the KV cache before a timed run goes in chunks of this many tokens: its logits (chunk x
# vocab floats) stay small, as an app's chunked prompt processing keeps them.
FILL_CHUNK = 256
ADAPTER_DIR = "adapters"  # runtime LoRA: the bundle's adapter files


@dataclass(frozen=True)
class BenchSpec:
    prompt_tokens: int = 128
    new_tokens: int = 128
    warmup: int = 1
    repeats: int = 3
    threads: int = 0  # 0: the runtime's default
    seed: int = 0
    # Tokens already in the KV cache before the timed prefill and decode (llama-bench's -d): one set of
    # measurements per depth. The first depth's medians are the result's top-level figures.
    depths: tuple = (0,)
    adapter: str | None = None  # runtime LoRA: the bundle's adapter active in the run

    @property
    def max_tokens(self) -> int:
        """The longest sequence a run holds: deepest context + prompt + new tokens."""
        return max(self.depths) + self.prompt_tokens + self.new_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    def to_args(self) -> list:
        """The bench agent's command line for this spec (read back by `bench_agent_main`)."""
        return ["--prompt-tokens", str(self.prompt_tokens), "--new-tokens", str(self.new_tokens),
                "--repeats", str(self.repeats), "--warmup", str(self.warmup), "--threads", str(self.threads),
                "--depths", ",".join(map(str, self.depths))] + (["--adapter", self.adapter] if self.adapter else [])


def parse_depths(text: str) -> tuple:
    """'0,512,1024' -> (0, 512, 1024); ValueError unless distinct token counts >= 0."""
    try:
        depths = tuple(int(d) for d in text.split(","))
    except ValueError:
        depths = ()
    if not depths or any(d < 0 for d in depths) or len(set(depths)) != len(depths):
        raise ValueError(f"--depths {text}: expected distinct token counts >= 0, comma-separated, e.g. 0,512,1024")
    return depths


@dataclass
class BenchResult:
    """One benchmark run of one artifact on one device; medians over `spec.repeats`."""

    runtime: dict
    device: dict
    bundle: dict
    spec: dict
    load_s: float
    ttft_s: float
    prefill_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_mb: float
    artifact_bytes: int
    samples: dict = field(default_factory=dict)
    # One entry per context depth: depth, ttft_s, prefill_s, prefill_tokens_per_s, decode_tokens_per_s,
    # samples. Optional in the schema: results written before depths existed have only depth 0 above.
    by_depth: list = field(default_factory=list)
    # Memory of the run on transparent huge pages at its end (Linux; see runtimes.agent.HUGE_PAGE_MALLOC).
    huge_pages_mb: float = 0.0
    schema: str = BENCH_SCHEMA

    def to_dict(self) -> dict:
        return asdict(self)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def proc_file_mb(path: str, key: str):
    """A "key: N kB" line of a /proc file (status, smaps_rollup) in MB, or None where the file or line is
    missing (not Linux, the process gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process.

    Linux: VmHWM, because ru_maxrss survives exec and would report the parent's peak in a child
    started by a large process. Elsewhere ru_maxrss (macOS reports bytes, others KiB).
    """
    peak = proc_file_mb("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def huge_pages_mb() -> float:
    """Anonymous memory of this process on transparent huge pages; 0 where there is none to read."""
    return proc_file_mb("/proc/self/smaps_rollup", "AnonHugePages") or 0.0


def sha256_file(path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# CPU features that change which kernels BLAS, torch and onnxruntime run (and so their last bits):
# x86 vector and int8 dot-product extensions, ARM's dot product, int8 matmul and scalable vectors.
KERNEL_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                   "avx_vnni", "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme", "sme2")

# Linux arm64's AT_HWCAP and AT_HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h), named as /proc/cpuinfo
# names them: the kernel's own list of what user space may use, which qemu-user fills in for the CPU it
# emulates (while the /proc/cpuinfo it shows is the host's).
ARM64_HWCAP = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp",
               "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512",
               "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg")
ARM64_HWCAP2 = ("dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint",
                "svei8mm", "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte", "ecv",
                "afp", "rpres", "mte3", "sme", "smei16i64", "smef64f64", "smei8i32", "smef16f32", "smeb16f32",
                "smef32f32", "smefa64", "wfxt", "ebf16", "sveebf16", "cssc", "rprfm", "sve2p1", "sme2", "sme2p1",
                "smei16i32", "smebi32i32", "smeb16b16", "smef16f16", "mops", "hbc", "sveb16b16", "lrcpc3", "lse128")
AT_HWCAP, AT_HWCAP2 = 16, 26


def arm64_hwcap_features(hwcap: int, hwcap2: int) -> list:
    """The feature names of an arm64 AT_HWCAP / AT_HWCAP2 pair, in the kernel's order."""
    return ([name for bit, name in enumerate(ARM64_HWCAP) if hwcap >> bit & 1]
            + [name for bit, name in enumerate(ARM64_HWCAP2) if hwcap2 >> bit & 1])


def read_hwcaps(auxv: str = "/proc/self/auxv"):
    """(AT_HWCAP, AT_HWCAP2) of this process from its auxiliary vector (64-bit Linux), or None."""
    import struct

    try:
        with open(auxv, "rb") as f:
            data = f.read()
    except OSError:
        return None
    entries = dict(struct.iter_unpack("=QQ", data[: len(data) // 16 * 16]))
    if AT_HWCAP not in entries:
        return None
    return entries[AT_HWCAP], entries.get(AT_HWCAP2, 0)


def cpu_facts(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU's model name and the kernel-relevant features it reports (Linux; elsewhere what platform says).
    On Linux arm64 the features come from the HWCAPs, which are right under emulation too."""
    model, features = None, set()
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "model") and value.strip() and (model is None or key == "model name"):
            model = value.strip()  # x86's "model name"; ARM boards' "Model" (Raspberry Pi 5 Model B ...)
        elif key in ("flags", "features"):
            features.update(value.split())
    hwcaps = read_hwcaps() if sys.platform.startswith("linux") and platform.machine() == "aarch64" else None
    if hwcaps:
        features = set(arm64_hwcap_features(*hwcaps))
    if model is None or model.isdigit():  # x86's numeric "model" without a "model name"
        model = platform.processor() or model
    return {"cpu_model": model, "cpu_features": [f for f in KERNEL_FEATURES if f in features]}


def transparent_huge_pages() -> str | None:
    """The kernel's THP mode (always, madvise or never), which decides what `huge_pages_mb` can be; None
    where there is no such setting (not Linux)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def local_device_facts() -> dict:
    return {
        "name": "local",
        "hostname": platform.node(),
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_count": os.cpu_count(),
        **cpu_facts(),
        "transparent_huge_pages": transparent_huge_pages(),
        "python": platform.python_version(),
    }


def _meminfo_mb() -> dict:
    """MemTotal and MemAvailable (what can be allocated without swapping out others) from /proc/meminfo."""
    facts = {"mem_total_mb": None, "mem_available_mb": None}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "MemTotal":
                    facts["mem_total_mb"] = int(value.split()[0]) // 1024
                elif key == "MemAvailable":
                    facts["mem_available_mb"] = int(value.split()[0]) // 1024
    except OSError:  # not Linux: the total from sysconf, availability unknown
        try:
            facts["mem_total_mb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
        except (ValueError, OSError, AttributeError):
            pass
    return facts


def installed_version(package: str):
    """The installed version of a distribution importable by this interpreter, or None."""
    import importlib.util

    try:
        if importlib.util.find_spec(package) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return "unknown"
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


RUNTIME_PACKAGES = ("onnxruntime", "executorch", "torch", "numpy")


def device_facts(path: str = ".") -> dict:
    """What a preflight needs to know about this machine: the basics, memory, free disk under `path`
    (its nearest existing parent), the interpreter and which runtimes it can import."""
    facts = local_device_facts()
    facts.update(_meminfo_mb())
    probe = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    facts["disk_free_mb"] = shutil.disk_usage(probe).free // (1 << 20)
    facts["python_executable"] = sys.executable
    facts["runtimes"] = {name: installed_version(name) for name in RUNTIME_PACKAGES}
    return facts


def bench_agent_main(runtime_class, argv: list | None = None) -> int:
    """The command line of a bench agent: `python -m runtimes.X BUNDLE [BenchSpec.to_args()]` -> the result
    JSON on stdout."""
    import argparse
    import json

    def depths(text):
        try:
            return parse_depths(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser = argparse.ArgumentParser(description=f"Benchmark an edgec bundle's {runtime_class.format} artifact "
                                                 f"with {runtime_class.name}")
    parser.add_argument("bundle")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--depths", type=depths, default=(0,), help="comma-separated context depths, e.g. 0,512,1024")
    parser.add_argument("--adapter", help="runtime LoRA: the bundle's adapter to activate")
    args = parser.parse_args(argv)
    spec = BenchSpec(args.prompt_tokens, args.new_tokens, args.warmup, args.repeats, args.threads, depths=args.depths,
                     adapter=args.adapter)
    runtime = runtime_class(args.bundle, threads=spec.threads)
    started = time.perf_counter()
    runtime.set_adapter(spec.adapter)
    runtime.adapter_load_s = time.perf_counter() - started
    json.dump(runtime.bench(spec).to_dict(), sys.stdout)
    return 0


def bundle_adapters(manifest: dict | None, fmt: str) -> dict:
    """Runtime LoRA: adapter name -> its manifest entry ('file' relative to the bundle), for the artifact of
    that format."""
    for artifact in (manifest or {}).get("artifacts", []):
        if artifact.get("format") == fmt:
            return {a["name"]: a for a in (artifact.get("lora") or {}).get("adapters", [])}
    return {}


def bundle_adapter_file(bundle_dir: str | Path, manifest: dict | None, fmt: str, name: str) -> Path:
    """The file of the runtime LoRA adapter `name` of a bundle's artifact of that format; a ValueError
    listing the adapters there when it has none of that name."""
    entries = bundle_adapters(manifest, fmt)
    if name not in entries:
        raise ValueError(f"adapter {name}: not in {bundle_dir} (adapters: {', '.join(entries) or 'none'})")
    return Path(bundle_dir) / entries[name]["file"]


def greedy(step, prompt: list, new_tokens: int, eos_ids: tuple = (), timings: list | None = None,
           context: list | None = None) -> list:
    """Greedy decoding with a model's `step(ids [1, seq] int64 array, start) -> logits of the last position`
    on a fresh KV cache: the new tokens (stops early at an EOS id when given). `context`: tokens put in the
    cache first, untimed, in chunks of FILL_CHUNK (a conversation so far); the prompt follows them.
    `timings`, if given, receives (prefill s, time to first token s, decode s)."""
    import time

    import numpy as np

    context = list(context or [])
    for start in range(0, len(context), FILL_CHUNK):
        step(np.asarray([context[start:start + FILL_CHUNK]], dtype=np.int64), start)
    started = time.perf_counter()
    logits = step(np.asarray([prompt], dtype=np.int64), len(context))
    prefill = time.perf_counter() - started
    out = [int(np.argmax(logits))]
    ttft = time.perf_counter() - started
    decode_started = time.perf_counter()
    position = len(context) + len(prompt)
    while len(out) < new_tokens and out[-1] not in eos_ids:
        out.append(int(np.argmax(step(np.asarray([[out[-1]]], dtype=np.int64), position))))
        position += 1
    if timings is not None:
        timings[:] = [prefill, ttft, time.perf_counter() - decode_started]
    return out


class Runtime:
    """One artifact of a bundle loaded in a runtime. A subclass loads it in `__init__(bundle_dir,
    artifact_path=None, threads=0)` (setting `load_s`, `version`, `vocab_size`) and gives the model's step
    (`start_sequence`) and the validation interface (`empty_cache`, `forward`); generation and the
    benchmark are the same for every runtime."""

    name = "runtime"
    format = ""  # the artifact format it runs (runtimes.registry)
    max_positions = None  # a fixed context the artifact holds, if any
    bundle_dir = "."
    load_s = 0.0
    version = "unknown"
    threads = 0
    vocab_size = 0
    adapter = None  # runtime LoRA: the active adapter's name
    adapter_load_s = 0.0

    def set_adapter(self, name: str | None, file=None) -> None:
        """Activate one of the bundle's runtime LoRA adapters (None: the base alone)."""
        if name is not None:
            raise ValueError(f"adapter {name}: {self.name} runs no runtime LoRA adapters")

    def start_sequence(self, total_tokens: int, **options):
        """step(ids [1, seq] int64, start) -> the last position's logits [vocab], on a fresh KV cache that
        holds up to total_tokens."""
        raise NotImplementedError

    def empty_cache(self):
        raise NotImplementedError

    def forward(self, ids, cache, start: int):
        """(logits of every position of the chunk ids [1, seq] written at `start`: [1, seq, vocab], the
        cache after it)."""
        raise NotImplementedError

    def runtime_facts(self) -> dict:
        facts = {"name": self.name, "version": self.version, "threads": self.threads or os.cpu_count()}
        if self.adapter:
            facts.update(adapter=self.adapter, adapter_load_s=round(self.adapter_load_s, 4))
        return facts

    def generate(self, prompt: list, new_tokens: int, eos_ids: tuple = (), timings: list | None = None,
                 context: list | None = None, **sequence_options) -> list:
        """Greedy decoding (see `greedy`); options go to `start_sequence`."""
        step = self.start_sequence(len(context or ()) + len(prompt) + new_tokens, **sequence_options)
        return greedy(step, prompt, new_tokens, eos_ids, timings, context)

    def bench(self, spec: BenchSpec) -> BenchResult:
        import numpy as np

        if self.max_positions and spec.max_tokens > self.max_positions:
            raise ValueError(f"depth + prompt + new tokens = {spec.max_tokens} exceed the artifact's "
                             f"{self.max_positions} positions; rebuild with a larger --max-seq-len")
        rng = np.random.default_rng(spec.seed)
        # At depth d the cache holds d tokens that precede the prompt, from the same random stream.
        tokens = rng.integers(3, self.vocab_size, size=max(spec.depths) + spec.prompt_tokens).tolist()
        by_depth = bench_depths(spec, self.generate, tokens)
        return bench_result(self.runtime_facts(), self.bundle_dir, self.format, spec, self.load_s, by_depth)


def bench_depths(spec: BenchSpec, generate, tokens: list) -> list:
    """Measurements per context depth. `tokens`: max(depths) + prompt_tokens ids; the prompt is the first
    prompt_tokens, the context at depth d the d ids after them. `generate(prompt, new_tokens, timings=,
    context=)` is a runtime's greedy loop filling timings with (prefill s, time to first token s, decode s)."""
    def timed_run(prompt, new_tokens, context):
        timings: list = []
        generate(prompt, new_tokens, timings=timings, context=context)
        return timings

    prompt = tokens[:spec.prompt_tokens]
    for _ in range(spec.warmup):
        timed_run(prompt, min(spec.new_tokens, 8), [])
    by_depth = []
    for depth in spec.depths:
        context = tokens[spec.prompt_tokens:spec.prompt_tokens + depth]
        prefill, ttft, decode = [], [], []
        for _ in range(spec.repeats):
            p, t, d = timed_run(prompt, spec.new_tokens, context)
            prefill.append(p)
            ttft.append(t)
            decode.append(d)
        by_depth.append({"depth": depth, "ttft_s": median(ttft), "prefill_s": median(prefill),
                         "prefill_tokens_per_s": spec.prompt_tokens / median(prefill),
                         "decode_tokens_per_s": max(spec.new_tokens - 1, 1) / median(decode),
                         "samples": {"prefill_s": prefill, "ttft_s": ttft, "decode_s": decode}})
    return by_depth


def bench_result(runtime: dict, bundle_dir, fmt: str, spec: BenchSpec, load_s: float, by_depth: list) -> BenchResult:
    """The shared result of a runtime's bench: the first depth's medians at the top level."""
    bundle_dir = Path(bundle_dir)
    manifest = bundle_dir / "manifest.json"
    first = by_depth[0]
    return BenchResult(
        runtime=runtime,
        device=local_device_facts(),
        bundle={"path": str(bundle_dir), "format": fmt,
                "manifest_sha256": sha256_file(manifest) if manifest.exists() else None},
        spec=spec.to_dict(),
        load_s=load_s,
        ttft_s=first["ttft_s"],
        prefill_s=first["prefill_s"],
        prefill_tokens_per_s=first["prefill_tokens_per_s"],
        decode_tokens_per_s=first["decode_tokens_per_s"],
        peak_rss_mb=peak_rss_mb(),
        huge_pages_mb=huge_pages_mb(),
        artifact_bytes=sum(p.stat().st_size for p in bundle_dir.iterdir() if p.is_file()),
        samples=first["samples"],
        by_depth=by_depth,
    )
