"""`--quant auto --max-kl X`: per-module precision chosen to meet a KL target on calibration text at the
smallest size.

Each unit (compiler/quant/sensitivity.py) may be int4 in blocks of 128, 64 or 32, int8 (blocks of 128)
or fp32. Starting from the smallest choice everywhere, a greedy loop takes the upgrade with the largest
estimated KL saved per byte added until the estimated sum of the units' KLs meets the target; the whole
mixed model's KL is then measured on the calibration windows (PyTorch, the artifact's codes and int8
activations) and the target tightened or loosened from what was measured, keeping the smallest plan
that met it. Summing per-unit KLs ignores how errors compound, which is why the measured figure decides.
A build with a .pte measures everything as the .pte computes (XNNPACK's grid and per-token activations),
the larger error of the two formats, so that both artifacts meet the target with one plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from compiler.config import QuantConfig
from compiler.models.decoder import CanonicalDecoder
from compiler.quant.sensitivity import (FP32, INT4_BLOCKS, INT8, SCHEMES, Probe, Scheme, Unit, mixed_kl,
                                       quantized_weights, sensitivities, units)

SENSITIVITY_WINDOWS = 4  # of 128 tokens; the sensitivity and verification forwards grow linearly with it
VERIFY_ROUNDS = 4
# The plan's KL is computed in PyTorch as the kernels round (their grids, int8 activations); the artifacts'
# own KL on the same windows, which the build's kl_calibration gate checks, came out 13% under to 3% over
# it on SmolLM2-135M-Instruct: plan for a little less than the target.
PLAN_HEADROOM = 0.95


@dataclass
class AutoResult:
    quant: QuantConfig  # with its plan
    precomputed: dict[str, dict]  # grid -> GPTQ's codes per torch module at the plan's block ({}: none)
    summary: dict  # for the build report and the manifest
    smoothing_log: dict[str, list[str]]  # the fold points GPTQ's calibration pass considered and smoothed


def greedy(all_units: list[Unit], kl: dict[str, dict[Scheme, float]], target: float,
           fixed: dict[str, Scheme]) -> dict[str, Scheme]:
    """The smallest choice everywhere, then the best KL-saved-per-byte upgrade until the sum meets `target`,
    then the upgrades that overshoot made unneeded given back."""
    plan = {u.path: fixed.get(u.path) or min(SCHEMES, key=u.nbytes) for u in all_units}
    total = sum(kl[u.path][plan[u.path]] for u in all_units)
    while total > target:
        best, best_gain = None, 0.0
        for unit in all_units:
            if unit.path in fixed:
                continue
            now = plan[unit.path]
            for scheme in SCHEMES:
                added = unit.nbytes(scheme) - unit.nbytes(now)
                saved = kl[unit.path][now] - kl[unit.path][scheme]
                if added > 0 and saved > 0 and saved / added > best_gain:
                    best, best_gain = (unit, scheme), saved / added
        if best is None:
            break
        unit, scheme = best
        total -= kl[unit.path][plan[unit.path]] - kl[unit.path][scheme]
        plan[unit.path] = scheme
    # The last upgrade may be a large one (a tied table to int8) that overshoots the target by far:
    # give back, most bytes freed per KL added first, the upgrades the target no longer needs.
    while True:
        best, best_gain = None, 0.0
        for unit in all_units:
            now = plan[unit.path]
            for scheme in () if unit.path in fixed else SCHEMES:
                freed = unit.nbytes(now) - unit.nbytes(scheme)
                added = kl[unit.path][scheme] - kl[unit.path][now]
                if freed > 0 and total + added <= target and freed / max(added, 1e-12) > best_gain:
                    best, best_gain = (unit, scheme, added), freed / max(added, 1e-12)
        if best is None:
            return plan
        unit, scheme, added = best
        total += added
        plan[unit.path] = scheme


def plan_auto(model: CanonicalDecoder, model_dir: Path, quant: QuantConfig, log=lambda _: None,
              grids: list[str] = ("onnx",)) -> AutoResult:
    """The plan for `quant.max_kl` on `model` (adapters merged), its GPTQ codes per grid and its summary."""
    from compiler.quant.gptq import calibration_sequences, gptq_codes

    vocab = model.cfg.vocab_size
    measured_grid = "xnnpack" if "xnnpack" in grids else "onnx"
    gptq: dict[int, dict] = {}  # block -> codes on the grid the sensitivities measure
    codes: dict[tuple[int, str], dict] = {}
    smoothing_log: dict[str, list[str]] = {}
    if quant.algo == "gptq":
        sequences = calibration_sequences(model_dir, quant.calibration, vocab)
        log(f"GPTQ at blocks {', '.join(map(str, INT4_BLOCKS))}, grids {', '.join(grids)}")
        wanted = [(block, grid) for block in INT4_BLOCKS for grid in grids]
        codes = gptq_codes(model, sequences, 4, wanted, True, smoothing=quant.smoothing, smoothing_log=smoothing_log)
        # With a .pte among the formats the plan is measured as the .pte computes (its grid, per-token
        # activations, int8 per channel), its larger error, so that every artifact meets --max-kl.
        gptq = {block: codes[(block, measured_grid)] for block in INT4_BLOCKS}
    probe = Probe(model, probe_sequences(model, model_dir, quant.calibration), quant.accuracy_level,
                  xnnpack=measured_grid == "xnnpack")
    all_units = units(model)
    log(f"sensitivity of {len(all_units)} modules")
    kl = sensitivities(model, probe, gptq)
    fixed = {}
    for unit in all_units:
        bits = quant.bits_for(unit.path, 4)
        if bits != 4:
            fixed[unit.path] = FP32 if bits == 0 else INT8
    # Measure, then move the greedy loop's target: by the ratio of wanted to measured KL until one plan
    # met it and one did not, then halfway between those two targets. Keep the smallest plan that met
    # it (or, if none did, the one nearest to it).
    aim = quant.max_kl * PLAN_HEADROOM
    target, tried, met_at, missed_at = aim, [], None, None
    for _ in range(VERIFY_ROUNDS):
        plan = greedy(all_units, kl, target, fixed)
        if any(p == plan for p, _ in tried):
            break
        measured = mixed_kl(probe, plan, all_units, lambda u, s: quantized_weights(model, u, s, gptq, probe.xnnpack))
        tried.append((plan, measured))
        log(f"plan for estimated KL {target:.4g}: {_size(all_units, plan) / 1e6:.1f} MB, measured KL {measured:.4g}")
        if measured <= aim:
            met_at = max(met_at or 0.0, target)
        else:
            missed_at = min(missed_at or float("inf"), target)
        if measured <= 0:
            break
        if met_at is not None and missed_at is not None:
            target = (met_at + missed_at) / 2
        else:
            target *= (aim / measured) * (0.95 if measured > aim else 1.0)
    met = [(p, m) for p, m in tried if m <= aim]
    plan, measured = min(met, key=lambda t: _size(all_units, t[0])) if met else min(tried, key=lambda t: t[1])
    entries = []
    for unit in all_units:
        paths = ("model.embed_tokens", "lm_head") if unit.path == "lm_head" and len(unit.members) == 2 else (unit.path,)
        bits, block = plan[unit.path]
        entries += [(p, bits, unit.block(block) if bits else 0) for p in paths]
    planned = replace(quant, plan=tuple(entries))
    precomputed: dict[str, dict] = {grid: {} for grid in grids} if codes else {}
    for grid, chosen in precomputed.items():
        for unit in all_units:
            bits, block = plan[unit.path]
            for member in unit.members if bits == 4 else ():
                if member in codes[(block, grid)]:  # an untied embedding is rounded to nearest by the pass
                    chosen[member] = codes[(block, grid)][member]
    ranked = sorted(kl, key=lambda p: -kl[p][(4, INT4_BLOCKS[0])])
    counts: dict[str, int] = {}
    for scheme in plan.values():
        key = "fp32" if scheme == FP32 else f"int{scheme[0]}" + (f"_block{scheme[1]}" if scheme[0] == 4 else "")
        counts[key] = counts.get(key, 0) + 1
    summary = {
        "max_kl": quant.max_kl,
        "planned_for": round(aim, 6),
        "measured_as": "pte" if probe.xnnpack else "onnx",
        "kl_calibration": round(measured, 5),
        "met": measured <= aim,
        "weight_mb": round(_size(all_units, plan) / 1e6, 2),
        "int4_block128_mb": round(_size(all_units, {u.path: (4, 128) for u in all_units}) / 1e6, 2),
        "modules": counts,
        "rounds": [{"weight_mb": round(_size(all_units, p) / 1e6, 2), "kl_calibration": round(m, 5)} for p, m in tried],
        "most_sensitive": [{"module": p, "kl_int4_block128": round(kl[p][(4, 128)], 5),
                            "kl_int4_block32": round(kl[p][(4, 32)], 5), "chosen": _name(plan[p])}
                           for p in ranked[:10]],
        "sensitivity_int4_block128": {p: round(kl[p][(4, 128)], 6) for p in ranked},
    }
    return AutoResult(planned, precomputed, summary, smoothing_log)


def _size(all_units: list[Unit], plan: dict[str, Scheme]) -> int:
    return sum(u.nbytes(plan[u.path]) for u in all_units)


def _name(scheme: Scheme) -> str:
    return "fp32" if scheme == FP32 else f"int{scheme[0]} block {scheme[1]}"


def probe_sequences(model: CanonicalDecoder, model_dir: Path, calibration: str | None,
                    count: int = SENSITIVITY_WINDOWS) -> list[list[int]]:
    """Calibration windows to measure on: the calibration text, or without a tokenizer fixed token windows."""
    from compiler.quant.gptq import calibration_sequences

    if (model_dir / "tokenizer.json").exists():
        return calibration_sequences(model_dir, calibration, model.cfg.vocab_size, count=count)
    return _token_windows(model.cfg.vocab_size, count)


def _token_windows(vocab: int, count: int = SENSITIVITY_WINDOWS, length: int = 128) -> list[list[int]]:
    """Without a tokenizer (--algo rtn): fixed pseudo-random token windows."""
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (count, length)).tolist()
