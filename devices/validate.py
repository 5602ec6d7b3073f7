"""`edgec validate BUNDLE --device URL`: the build's gates, run on a device against the bundle's golden data.

The device needs only its runtime and numpy: the reference's logits and greedy tokens travel in the bundle
(golden.npz), `runtimes.validation` computes the metrics there, and the gates are applied here. Each
device's verdict is recorded in the manifest under `device_validation`, one entry per device and format.
"""

from __future__ import annotations

import time
from pathlib import Path

from compiler.bundle import read_manifest, write_manifest
from compiler.config import ValidationConfig
from compiler.errors import UsageError
from devices.base import Device
from devices.bench import _artifact, run_agent
from runtimes.base import BenchSpec
from runtimes.registry import RUNTIMES
from runtimes.validation import GOLDEN_FILE, load_golden


def validate_on_device(bundle: Path, device: Device, gate_overrides: dict | None = None, fmt: str | None = None,
                       timeout_s: float = 0, keep: bool = False, log=None) -> list[dict]:
    """Validate each artifact (or the one of `fmt`) on `device`; record and return the verdicts."""
    from compiler.validate import gate_results

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if GOLDEN_FILE not in manifest["files"]:
        raise UsageError(f"{bundle}: no {GOLDEN_FILE} (the reference's outputs a device compares with); rebuild the "
                         "bundle without --no-validate")
    artifacts = [_artifact(manifest, bundle, fmt)] if fmt else [a for a in manifest["artifacts"] if a["format"] in RUNTIMES]
    if not artifacts:
        _artifact(manifest, bundle)  # raises the one-line error naming the formats there
    validation = manifest["build_config"].get("validation", {})
    gates_config = ValidationConfig(gate_overrides={**validation.get("gate_overrides", {}), **(gate_overrides or {})})
    golden = load_golden(bundle / GOLDEN_FILE)
    # The preflight sizes the run: the longest prompt and the greedy tokens, one pass.
    spec = BenchSpec(prompt_tokens=max(map(len, golden["prompts"])), new_tokens=len(golden["tokens"][0]), warmup=0,
                     repeats=1, threads=device.threads)
    verdicts = []
    for artifact in artifacts:
        args = ["--format", artifact["format"], "--threads", str(device.threads)]
        run = run_agent(bundle, manifest, artifact, device, "validation", args, spec, timeout_s, keep, log)
        facts = device.describe(run.facts)
        verdict = gate_results(run.result["metrics"], gates_config.gates(artifact["precision"]))
        verdict.update(
            format=artifact["format"],
            device={key: facts[key] for key in ("name", "kind", "arch", "cpu_model", "cpu_features", "os",
                                                "emulated_cpu") if key in facts},
            runtime=run.result["runtime"],
            prompts=run.result["prompts"],
            validated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        verdicts.append(verdict)
    # Written once, after every run: the manifest's sha256 keys the bundle's copy on the device.
    manifest = read_manifest(bundle)
    done = {(v["device"]["name"], v["format"]) for v in verdicts}
    manifest["device_validation"] = [
        *(v for v in manifest.get("device_validation", []) if (v["device"]["name"], v["format"]) not in done),
        *({k: v for k, v in verdict.items() if k != "prompts"} for verdict in verdicts)]
    write_manifest(bundle, manifest)
    return verdicts

