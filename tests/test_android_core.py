"""android-demo/core (the app's testable Kotlin) against vectors edgec writes: a real validated bundle and
its golden.npz, recorded artifact logits with the metrics and verdict edgec computes from them, a bench
result from `edgec bench --json`; and the Kotlin side's bench JSON read back by `edgec report`.

Runs `make android-core-test` (the npm registry's kotlinc, Debian's JUnit 5 console launcher); skips when
java, or npm without a cached kotlinc, is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from compiler.cli import main
from compiler.config import ValidationConfig
from compiler.validate import gate_results
from runtimes.validation import GOLDEN_FILE, compare, load_golden

ROOT = Path(__file__).resolve().parents[1]
KOTLINC = Path.home() / ".cache/edgec/kotlin/node_modules/kotlin-compiler/bin/kotlinc"
JUNIT_JAR = Path("/usr/share/java/junit-platform-console-standalone.jar")


def _missing_tools() -> str | None:
    if not shutil.which("java"):
        return "java is not installed (the Kotlin core runs on a JVM 17+)"
    if not KOTLINC.exists() and not shutil.which("npm"):
        return "no kotlinc cached and no npm to install the npm registry's kotlin-compiler"
    if not JUNIT_JAR.exists() and os.geteuid() != 0 and not shutil.which("sudo"):
        return f"{JUNIT_JAR} is missing (Debian's junit5) and there is no root to install it"
    return None


pytestmark = pytest.mark.skipif(_missing_tools() is not None, reason=_missing_tools() or "")


class Replay:
    """Recorded artifact logits and greedy tokens behind the Runtime interface compare() drives."""

    def __init__(self, prompts, logits, tokens):
        self.prompts, self.logits, self.tokens = prompts, logits, tokens

    def empty_cache(self):
        return None

    def forward(self, ids, cache, start):
        chunk = ids[0].tolist()
        if start == 0:
            cache = next(i for i, p in enumerate(self.prompts) if p[:len(chunk)] == chunk)
        return self.logits[cache][None, start:start + len(chunk)], cache

    def generate(self, ids, new_tokens):
        return self.tokens[self.prompts.index(list(ids))]


def test_kotlin_core_reads_edgec_vectors(validated_bundle, tmp_path):
    golden = load_golden(validated_bundle / GOLDEN_FILE)
    # An artifact a little off: logits with small noise, and one prompt's greedy tokens diverging at 5.
    rng = np.random.default_rng(7)
    logits = [(ref + rng.normal(0, 2e-3, ref.shape)).astype(np.float32) for ref in golden["logits"]]
    tokens = [list(t) for t in golden["tokens"]]
    tokens[1][5] = (tokens[1][5] + 1) % logits[1].shape[1]
    arrays = {f"logits_{i}": a for i, a in enumerate(logits)}
    arrays.update({f"tokens_{i}": np.asarray(t, dtype=np.int64) for i, t in enumerate(tokens)})
    np.savez(tmp_path / "artifact.npz", **arrays)
    per_prompt, worst, _ = compare(Replay(golden["prompts"], logits, tokens), golden)
    verdict = gate_results(worst, ValidationConfig().gates("fp32"))
    assert not verdict["passed"]  # the vectors must exercise the failure text too

    bench = CliRunner().invoke(main, ["bench", str(validated_bundle), "--prompt-tokens", "8", "--new-tokens", "4",
                                      "--repeats", "3", "--warmup", "0", "--depths", "0,16", "--json", "--quiet"])
    assert bench.exit_code == 0, bench.output
    (tmp_path / "bench.json").write_text(bench.stdout)
    kotlin_bench = tmp_path / "kotlin-bench.json"
    (tmp_path / "vectors.json").write_text(json.dumps({
        "bundle": str(validated_bundle), "artifact": "artifact.npz", "bench_json": str(tmp_path / "bench.json"),
        "kotlin_bench_out": str(kotlin_bench),
        "expected": {"metrics": worst, "prompts": per_prompt, "verdict": verdict}}))

    run = subprocess.run(["make", "-s", "android-core-test"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "EDGEC_ANDROID_VECTORS": str(tmp_path)})
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    counts = {m.group(2): int(m.group(1)) for m in re.finditer(r"(\d+) tests (\w+)", output)}
    assert counts.get("successful", 0) >= 10 and counts.get("failed") == 0 and counts.get("aborted") == 0, output[-3000:]

    report = CliRunner().invoke(main, ["report", str(tmp_path / "bench.json"), str(kotlin_bench), "--no-chart"])
    assert report.exit_code == 0, report.output
    row = next(line for line in report.stdout.splitlines() if line.startswith("| kotlin-bench |"))
    assert "adb:test" in row and "kotlin-core-test" in row
    assert sum(line.startswith("| kotlin-bench | 16 |") for line in report.stdout.splitlines()) == 1
