"""`edgec bench`: preflight a device, stage the bundle there, run the runtime's bench agent, read its result.

The same steps for every device: probe (facts + which bundle files it holds) -> preflight (context, runtime,
Python, memory, disk; refuse before anything is pushed) -> stage -> run under --timeout and the memory cap
-> one result in the shared `edgec.bench/1` schema, with the device's facts in it.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from compiler.bundle import MANIFEST, read_manifest
from compiler.errors import EdgecError, UsageError
from devices.base import PROFILES, Device
from devices.local import LocalDevice
from runtimes.base import FILL_CHUNK, BenchSpec, bundle_adapters, sha256_file
from runtimes.base import parse_depths as parse_depth_list
from runtimes.registry import RUNTIMES
MIN_PYTHON = (3, 8)
# Resident memory of the bench agent before any weights: Python, numpy, onnxruntime and its arena, as
# measured here with a 0.6 MB bundle (65-68 MB peak).
RUNTIME_OVERHEAD_MB = 64
DISK_MARGIN = 1.1


def parse_size_mb(text: str, option: str = "--memory-cap") -> float:
    """'2GB', '1800MB', '1.5G', '512M', '1800' (MB) -> megabytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"{option} {text}: expected a size such as 2GB, 1800MB or 512M")
    scale = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}[match.group(2)]
    return float(match.group(1)) * scale


def parse_depths(text: str) -> tuple[int, ...]:
    try:
        return parse_depth_list(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def make_device(url: str, profile: str | None = None, memory_cap: str | None = None, huge_pages: bool = True,
                **ssh_options) -> Device:
    """--device local|emulator|ssh://user@host[:port]|adb[:SERIAL], with --profile (local only) or --memory-cap,
    and --huge-pages/--no-huge-pages (ignored on Android, whose C library has no such tunable)."""
    device = _device_at(url, profile, memory_cap, **ssh_options)
    device.huge_pages = huge_pages
    return device


def _device_at(url: str, profile: str | None, memory_cap: str | None, **ssh_options) -> Device:
    cap = parse_size_mb(memory_cap) if memory_cap else 0
    if profile and memory_cap:
        raise UsageError(f"--memory-cap {memory_cap}: --profile {profile} sets its own cap; give one or the other")
    if url == "local":
        return LocalDevice(PROFILES[profile] if profile else None, cap)
    is_adb = url == "adb" or url.startswith("adb:")
    if url != "emulator" and not url.startswith("ssh://") and not is_adb:
        raise UsageError(f"--device {url}: expected local, emulator, ssh://user@host[:port], adb or adb:SERIAL")
    if profile:
        raise UsageError(f"--profile {profile}: profiles emulate a device on this machine (--device local); "
                         "on a real device use --threads and --memory-cap")
    if url == "emulator":  # its address, key and Python come from `edgec emulator up`
        from devices.emulator import emulator_device

        return emulator_device(cap)
    if is_adb:  # an Android phone running the edgec demo app
        from devices.adb import AdbDevice

        return AdbDevice(url, memory_cap_mb=cap)
    from devices.ssh import SshDevice

    return SshDevice(url, memory_cap_mb=cap, **ssh_options)


def _artifact(manifest: dict, bundle: Path, fmt: str | None = None) -> dict:
    for artifact in manifest.get("artifacts", []):
        if artifact.get("format") in RUNTIMES and fmt in (None, artifact.get("format")):
            return artifact
    if fmt:
        raise UsageError(f"{bundle}: no {fmt} artifact in this bundle; build it with --format {fmt}")
    formats = ", ".join(a.get("format", "?") for a in manifest.get("artifacts", [])) or "none"
    raise UsageError(f"{bundle}: no artifact edgec can benchmark yet (formats here: {formats}; supported: "
                     f"{', '.join(RUNTIMES)})")


def memory_estimate_mb(manifest: dict, artifact: dict, spec: BenchSpec) -> dict:
    """A floor on the run's resident memory: the weights (onnxruntime holds them in memory, once a session),
    the KV cache at the longest sequence, the largest logits block, and the runtime itself."""
    weights = sum(f["bytes"] for name, f in manifest["files"].items() if name.startswith(artifact["path"]))
    if artifact.get("prompt_graph"):  # its session packs its own copy of the weights
        weights *= 2
    kv = artifact["io"]["kv_cache"]
    per_token = 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * 4  # float32 keys and values
    copies = 1 if kv.get("shares_buffer") or kv.get("in_program") else 2  # else past and present live together
    # A cache held in the program (.pte) is allocated for all its positions, whatever the run uses.
    positions = kv["max_seq_len"] if kv.get("in_program") else spec.max_tokens
    logits_rows = max(spec.prompt_tokens, min(max(spec.depths), FILL_CHUNK))
    parts = {"weights_mb": weights / 2**20, "kv_cache_mb": per_token * positions * copies / 2**20,
             "logits_mb": logits_rows * manifest["model"]["vocab_size"] * 4 / 2**20,
             "runtime_mb": float(RUNTIME_OVERHEAD_MB)}
    parts["total_mb"] = sum(parts.values())
    return parts


def preflight(device: Device, facts: dict, manifest: dict, artifact: dict, spec: BenchSpec,
              push_bytes: int) -> dict:
    """Refuse, with what to do, a run that cannot work on this device; return the memory estimate."""
    fmt = artifact["format"]
    packages = RUNTIMES[fmt].packages
    python = facts.get("python_executable") or "python3"
    missing = [p for p in packages if not facts.get("runtimes", {}).get(p)]
    if missing:
        built_with = manifest.get("runners", {})
        hint = f" (the bundle runs in {', '.join(built_with)} too)" if built_with else ""
        raise EdgecError(f"{device.name}: {' and '.join(missing)} not installed for {python} (Python "
                         f"{facts.get('python')}), so nothing there runs the {fmt} bundle; install it on the "
                         f"device: {python} -m pip install {' '.join(missing)}{hint}")
    version = tuple(int(x) for x in str(facts.get("python", "0.0")).split(".")[:2])
    if "python" in facts and version < MIN_PYTHON:  # a phone runs the demo app, no Python
        raise EdgecError(f"{device.name}: Python {facts.get('python')} is too old for the bench agent (needs "
                         f"{'.'.join(map(str, MIN_PYTHON))}+); install a newer python3 or pass --remote-python")
    estimate = memory_estimate_mb(manifest, artifact, spec)
    limits = {"free memory": facts.get("mem_available_mb"), "memory cap": device.memory_cap_mb or None}
    limits = {k: v for k, v in limits.items() if v}
    if limits:
        which, available = min(limits.items(), key=lambda kv: kv[1])
        estimate["available_mb"], estimate["limited_by"] = available, which
        if estimate["total_mb"] > available:
            raise EdgecError(
                f"{device.name}: the bundle does not fit: it needs at least {estimate['total_mb']:.0f} MB "
                f"(weights {estimate['weights_mb']:.0f} + KV cache {estimate['kv_cache_mb']:.0f} for "
                f"{spec.max_tokens} tokens + logits {estimate['logits_mb']:.0f} + runtime "
                f"{estimate['runtime_mb']:.0f}) but the {which} is {available:.0f} MB; refused before anything ran. "
                "Try a --quant int4 build, smaller --depths, or a device with more memory")
    disk = facts.get("disk_free_mb")
    if push_bytes and disk is not None and push_bytes * DISK_MARGIN / 2**20 > disk:
        raise EdgecError(f"{device.name}: {push_bytes / 2**20:.0f} MB to push but only {disk} MB free on the "
                         f"device's disk; {device.disk_hint}")
    return estimate


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _outcome_error(device: Device, outcome: dict, timeout_s: float) -> EdgecError:
    status, seconds = outcome.get("status"), outcome.get("seconds") or 0
    if status == "timeout":
        return EdgecError(f"{device.name}: the benchmark ran past --timeout {timeout_s:g} s and was stopped (its "
                          "process group killed); raise --timeout, or lower --repeats, --new-tokens or --depths")
    if status == "memory":
        return EdgecError(f"{device.name}: the benchmark passed the memory cap of {device.memory_cap_mb:.0f} MB "
                          f"(resident {outcome.get('observed_peak_rss_mb', 0):.0f} MB) after {seconds:.1f} s and was "
                          "stopped: the bundle does not fit")
    if status == "killed":
        name = _signal_name(outcome.get("signal") or 0)
        return EdgecError(f"{device.name}: the bench agent was killed by {name} after {seconds:.1f} s (the "
                          "kernel's out-of-memory killer does this when memory runs out; see dmesg there)")
    if status == "disconnected":
        return EdgecError(f"{device.name}: the connection dropped during the run")
    last = (outcome.get("stderr", "").strip().splitlines() or ["no message"])[-1]
    return EdgecError(f"{device.name}: the agent failed (exit {outcome.get('returncode')}): {last[:200]}")


def run_bench(bundle: Path, spec: BenchSpec, device: Device | None = None, timeout_s: float = 0,
              keep: bool = False, log=None, fmt: str | None = None) -> dict:
    """Benchmark `bundle` on `device` (this machine by default); the result dict (edgec.bench/1)."""
    device = device or LocalDevice()
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    artifact = _artifact(manifest, bundle, fmt)
    context = artifact.get("max_seq_len") or manifest["model"].get("max_sequence_length")
    if context and spec.max_tokens > context:
        raise UsageError(f"--depths {','.join(map(str, spec.depths))}: the deepest run holds {spec.max_tokens} "
                         f"tokens (depth + --prompt-tokens {spec.prompt_tokens} + --new-tokens {spec.new_tokens}) "
                         f"but the model's context is {context}; lower the depths or token counts")
    if device.threads and spec.threads and spec.threads != device.threads:
        raise UsageError(f"--threads {spec.threads}: {device.name} sets {device.threads} threads")
    if spec.adapter is not None and spec.adapter not in bundle_adapters(manifest, artifact["format"]):
        known = ", ".join(bundle_adapters(manifest, artifact["format"])) or "none: built with --lora merge"
        raise UsageError(f"--adapter {spec.adapter}: not an adapter of {bundle}'s {artifact['format']} artifact "
                         f"(adapters: {known})")
    spec = BenchSpec(spec.prompt_tokens, spec.new_tokens, spec.warmup, spec.repeats,
                     spec.threads or device.threads, spec.seed, spec.depths, spec.adapter)
    runtime = RUNTIMES[artifact["format"]].module
    run = run_agent(bundle, manifest, artifact, device, runtime, spec.to_args(), spec, timeout_s, keep, log)
    result = run.result
    if device.memory_cap_mb and result["peak_rss_mb"] > device.memory_cap_mb:  # a spike between watchdog polls
        raise _outcome_error(device, {**run.outcome, "status": "memory", "observed_peak_rss_mb": result["peak_rss_mb"]},
                             timeout_s)
    result["device"] = {**device.describe(run.facts), "huge_pages": device.huge_pages}  # asked for; huge_pages_mb: got
    result["bundle"].update(path=str(bundle.resolve()), manifest_sha256=run.manifest_sha256)
    result["preflight"] = run.estimate
    return result


@dataclass
class AgentRun:
    result: dict  # the agent's JSON answer
    outcome: dict  # how its process ended (runtimes.agent.run_capped)
    facts: dict  # the device's, from the probe
    estimate: dict  # the preflight's memory estimate
    manifest_sha256: str


def run_agent(bundle: Path, manifest: dict, artifact: dict, device: Device, module: str, args: list,
              spec: BenchSpec, timeout_s: float = 0, keep: bool = False, log=None) -> AgentRun:
    """The steps every device run shares: probe, preflight (for a run of `spec`'s size), stage the bundle
    and the artifact's runtime, run `python -m runtimes.<module> BUNDLE ARGS...` there, read its JSON."""
    log = log or (lambda message: None)
    manifest_sha = sha256_file(bundle / MANIFEST)
    expected = {name: [f["bytes"], f["sha256"]] for name, f in manifest["files"].items()}
    expected[MANIFEST] = [(bundle / MANIFEST).stat().st_size, manifest_sha]
    key = manifest_sha[:16]

    facts, cached = device.probe(key, expected)
    push_bytes = sum(size for name, (size, _) in expected.items() if name not in cached)
    estimate = preflight(device, facts, manifest, artifact, spec, push_bytes)
    try:
        bundle_path = device.stage(bundle, key, expected, cached, RUNTIMES[artifact["format"]].module, log)
        if not isinstance(device, LocalDevice):  # locally the agent's start is not news
            log(f"running runtimes.{module} on {device.name}")
        outcome = device.run(module, bundle_path, args, timeout_s, keep)
        if outcome.get("status") != "ok":
            raise _outcome_error(device, outcome, timeout_s)
    except BaseException:
        try:  # the device's agent cleans up after itself; this covers an agent that could not
            device.cleanup(keep)
        except EdgecError:
            pass
        raise
    try:
        result = json.loads(outcome["stdout"])
    except ValueError:
        raise EdgecError(f"{device.name}: the agent's output is not JSON: {outcome['stdout'][:120]!r}") from None
    return AgentRun(result, outcome, facts, estimate, manifest_sha)


def log_to_stderr(message: str) -> None:
    print(f"edgec: {message}", file=sys.stderr, flush=True)
