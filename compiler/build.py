"""The build pipeline: load -> merge_lora -> export -> bundle -> validate, driven by a BuildConfig."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from compiler.bundle import BundleWriter, build_machine, read_manifest, write_manifest
from compiler.config import BuildConfig
from compiler.errors import CheckFailed, UsageError
from compiler.frontend.load import Checkpoint, ModelFiles, build_decoder, read_checkpoint, read_model_files
from compiler.frontend.lora import AdapterSpec, MergeRecord, merge_lora, merged_tensors
from compiler.memory import MemoryEstimate, WeightFacts, plan, release_module_pages, reused_heap
from compiler.models.decoder import CanonicalDecoder
from compiler.models.families import SWITCHED_ROPE_TYPES
from compiler.report import BuildReport, markdown
from runtimes.base import ADAPTER_DIR
from runtimes.validation import GOLDEN_FILE, save_golden

MODEL_FILE = "model.onnx"
DEFAULT_PTE_MAX_SEQ_LEN = 2048


@dataclass
class Reference:
    """The fp32 PyTorch reference (canonical decoder, adapters merged) and what validation needs of it."""

    model: CanonicalDecoder
    checkpoint: Checkpoint
    records: list[MergeRecord]
    source_hashes: dict[str, str]
    prompts: list[list[int]]
    lora: dict | None  # base and per-adapter log-probabilities, for LoRA delta retention
    golden: dict | None = None  # the reference's logits and greedy tokens on the prompts, once computed
    runtime_adapters: list = field(default_factory=list)  # --lora runtime: LoraPairs, kept apart from the base
    slots: object = None  # --lora runtime: the LoraSlots of every artifact
    adapter_golden: dict = field(default_factory=dict)  # adapter name -> (golden data, LoRA reference)
    calibration: tuple | None = None  # --quant auto: (calibration windows, the reference's logits on them)

    def golden_data(self, new_tokens: int) -> dict:
        from compiler.validate import golden

        if self.golden is None or len(self.golden["tokens"][0]) != new_tokens:
            self.golden = golden(self.model, self.prompts, new_tokens)
        return self.golden

    def calibration_reference(self, model_dir: Path, calibration: str | None) -> tuple[list, list]:
        """The windows `--quant auto` planned on and the reference's logits on them, once computed."""
        from compiler.quant.auto import probe_sequences
        from compiler.validate import torch_logits

        if self.calibration is None:
            windows = probe_sequences(self.model, model_dir, calibration)
            self.calibration = windows, [torch_logits(self.model, ids) for ids in windows]
        return self.calibration

    def adapter_reference(self, adapter, new_tokens: int) -> tuple[dict, dict]:
        """(golden data, LoRA reference) of the base with this runtime adapter merged."""
        from compiler.adapters import adapter_golden

        cached = self.adapter_golden.get(adapter.name)
        if cached is None or len(cached[0]["tokens"][0]) != new_tokens:
            cached = adapter_golden(self.model, self.prompts, new_tokens, adapter, self.golden_data(new_tokens))
            self.adapter_golden[adapter.name] = cached
        return cached


def load_reference(model_dir: Path, adapters: list[AdapterSpec], report: BuildReport, with_lora_reference: bool = True,
                   runtime_adapters: list[AdapterSpec] = (), files: ModelFiles | None = None):
    """adapters are merged; runtime_adapters (--lora runtime) are read and checked against the base, kept apart.
    files: the model directory's read_model_files, when already read."""
    from compiler.adapters import read_runtime_adapters
    from compiler.validate import prompt_ids, torch_logprobs

    with report.stage("load", str(model_dir)):
        with report.progress("weights", unit="B", unit_scale=True) as progress:
            checkpoint = read_checkpoint(model_dir, progress, files)
        source_hashes = checkpoint.source_hashes()
    cfg = checkpoint.config
    claimed = int(getattr(checkpoint.hf_config, "max_position_embeddings", cfg.max_sequence_length))
    if cfg.rope_type in SWITCHED_ROPE_TYPES and cfg.max_sequence_length < claimed:
        report.warn(f"{model_dir}: {cfg.rope_type} rope switches to its long-context table past "
                    f"{cfg.max_sequence_length} positions; the bundle's context is capped there (the model claims "
                    f"{claimed})")
    elif cfg.max_sequence_length < claimed:
        # families.decoder_config caps a sliding-window model at its window, where it equals full attention.
        report.warn(f"{model_dir}: sliding-window attention (window {cfg.max_sequence_length}) is built as full "
                    f"attention, exact within the window; the bundle's context is capped there (the model claims "
                    f"{claimed})")
    prompts = prompt_ids(model_dir, cfg.vocab_size, cfg.bos_token_id)
    records: list[MergeRecord] = []
    lora = None
    if adapters:
        with report.stage("merge_lora", f"{len(adapters)} adapter(s)"):
            steps = []
            if with_lora_reference:
                # Log-probs before and after each merge, on models sharing the checkpoint's tensors.
                steps.append(torch_logprobs(build_decoder(checkpoint, keep_state=True), prompts))
                after = lambda i: steps.append(torch_logprobs(build_decoder(checkpoint, keep_state=True), prompts))  # noqa: E731
            else:
                after = None
            with report.progress("modules", unit="module") as progress:
                records = merge_lora(checkpoint, adapters, after_each=after, progress=progress)
            if steps:
                lora = {
                    "base": steps[0],
                    "merged": steps[-1],
                    "adapters": [{"path": r.path, "delta": [b - a for a, b in zip(steps[i], steps[i + 1])]}
                                 for i, r in enumerate(records)],
                }
    pairs = []
    if runtime_adapters:
        with report.stage("read_adapters", f"{len(runtime_adapters)} adapter(s), kept apart from the base"):
            pairs = read_runtime_adapters(checkpoint, list(runtime_adapters))
    model = build_decoder(checkpoint)
    return Reference(model, checkpoint, records, source_hashes, prompts, lora, runtime_adapters=pairs)


def _validate_artifact(directory: Path, artifact: dict, reference: Reference, config: BuildConfig,
                       report: BuildReport) -> dict:
    """The gates for one artifact of a bundle, run in its own runtime; with runtime LoRA, for no adapter
    and for each adapter of the artifact against its own reference (failures named by adapter)."""
    from compiler.validate import calibration_kl, gate_results, validate
    from runtimes.registry import open_runtime, runtime_for

    gates = config.validation.gates(config.export.precision)
    quant = config.export.quant
    if quant and quant.max_kl is not None:
        gates["kl_calibration"] = ("max", quant.max_kl)  # the plan's promise, checked on the artifact
    new_tokens = config.validation.new_tokens
    stage = "validate" if artifact["format"] == "onnx" else f"validate_{artifact['format']}"
    with report.stage(stage, f"{runtime_for(artifact['format']).name} vs PyTorch reference"):
        runner = open_runtime(directory, artifact)
        with report.progress("prompts", unit="prompt") as progress:
            result = validate(runner, reference.golden_data(new_tokens), gates, reference.lora, progress)
        if "kl_calibration" in gates:
            windows, logits = reference.calibration_reference(config.model.path, quant.calibration)
            result["metrics"]["kl_calibration"] = calibration_kl(runner, windows, logits)
            result.update(gate_results(result["metrics"], gates))
    entries = (artifact.get("lora") or {}).get("adapters", [])
    if not entries:
        return result
    artifact["validation"] = result
    genai = _genai_runtime(directory, artifact)  # one model for the base and every adapter
    _genai_check(genai, artifact, None, reference.golden_data(new_tokens), result, gates)
    for entry in entries:
        validate_adapter(directory, artifact, entry, reference, config, report, runner, genai)
    runner.set_adapter(None)
    return result


def validate_adapter(directory: Path, artifact: dict, entry: dict, reference: Reference, config: BuildConfig,
                     report: BuildReport, runner=None, genai=None) -> None:
    """Validate one runtime LoRA adapter of an artifact against the base with it merged; record it in the
    adapter's entry and fold its failures, named by adapter, into the artifact's validation. runner and
    genai: the artifact's runtimes, opened here when not given."""
    from compiler.validate import validate
    from runtimes.registry import open_runtime

    gates = config.validation.gates(config.export.precision)
    new_tokens = len(reference.golden_data(config.validation.new_tokens)["tokens"][0])
    adapter = next(a for a in reference.runtime_adapters if a.name == entry["name"])
    stage = "validate_adapter" if artifact["format"] == "onnx" else f"validate_{artifact['format']}_adapter"
    with report.stage(stage, f"adapter {entry['name']} vs PyTorch reference with it merged"):
        golden_data, lora = reference.adapter_reference(adapter, new_tokens)
        runner = runner or open_runtime(directory, artifact)
        runner.set_adapter(entry["name"], directory / entry["file"])
        with report.progress("prompts", unit="prompt") as progress:
            entry["validation"] = validate(runner, golden_data, gates, lora, progress)
        _genai_check(genai or _genai_runtime(directory, artifact), artifact, entry["name"], golden_data,
                     entry["validation"], gates)
    result = artifact["validation"]
    result["passed"] = result["passed"] and entry["validation"]["passed"]
    result["failures"] += [f"adapter {entry['name']}: {f}" for f in entry["validation"]["failures"]]


def _genai_runtime(directory: Path, artifact: dict):
    """onnxruntime-genai on an ONNX artifact with runtime LoRA, where it is installed (else None)."""
    from importlib.util import find_spec

    if artifact["format"] != "onnx" or find_spec("onnxruntime_genai") is None:
        return None
    from runtimes.genai import GenaiRuntime

    return GenaiRuntime(directory)


def _genai_check(genai, artifact: dict, adapter: str | None, golden_data: dict, result: dict, gates: dict) -> None:
    """onnxruntime-genai's greedy tokens through its own Adapters API (genai: a GenaiRuntime, or None where
    there is none to check with)."""
    from compiler.adapters import genai_greedy_match
    from compiler.validate import gate_results

    if genai is None:
        return
    file = genai.bundle_dir / next(a["file"] for a in artifact["lora"]["adapters"] if a["name"] == adapter) \
        if adapter else None
    result["metrics"]["genai_greedy_match"] = genai_greedy_match(genai, golden_data, adapter, file)
    verdict = gate_results(result["metrics"], gates)
    for key in ("passed", "gates", "failures", "summary"):
        result[key] = verdict[key]


def build(config: BuildConfig, report: BuildReport) -> tuple[Path, dict]:
    """Build the bundle; raises CheckFailed after writing it when a validation gate fails."""
    if "pte" in config.export.formats and config.export.quant:
        from compiler.executorch.quantize import check_pte_quant

        check_pte_quant(config.export.quant)  # before the ONNX build of --format onnx,pte spends its time
    files = read_model_files(config.model.path, hash_sources=True)
    runtime_lora = config.lora.mode == "runtime"
    merged = merged_tensors(config.adapters) if not runtime_lora else set()
    memory = plan(WeightFacts.of(files.config, files.weight_files, merged), config)  # before a weight is read
    writer = BundleWriter(config.out, config.force)
    ahead = None
    try:
        ahead = _trace_ahead(config, files.config, memory) if not runtime_lora else None
        merged, kept_apart = ([], config.adapters) if runtime_lora else (config.adapters, [])
        reference = load_reference(config.model.path, merged, report, config.validation.enabled, kept_apart, files)
        if runtime_lora:
            _prepare_runtime_lora(config, reference, report)
        model, records, source_hashes = reference.model, reference.records, reference.source_hashes
        checkpoint = reference.checkpoint
        report.adapters = [r.to_dict() for r in records] + [a.describe() for a in reference.runtime_adapters]
        writer.copy_in(checkpoint.tokenizer_files + ([checkpoint.generation_config] if checkpoint.generation_config else []))
        if config.validation.enabled:
            with report.stage("reference", "fp32 PyTorch logits and greedy tokens on the validation prompts"):
                save_golden(writer.staging / GOLDEN_FILE, reference.golden_data(config.validation.new_tokens))
            release_module_pages(model)  # each later stage reads back what it needs (see release_pages)
        quant = config.export.quant
        if quant and quant.smoothing and (runtime_lora or quant.algo != "gptq"):
            # Smoothing comes with GPTQ's calibration pass. Runtime adapters read the linears' unsmoothed
            # inputs: their files would need the same scales.
            if runtime_lora and quant.algo == "gptq":
                report.note("--smoothing: off with --lora runtime")
            quant = config.export.quant = replace(quant, smoothing=0.0)
        grids = [grid for fmt, grid in (("onnx", "onnx"), ("pte", "xnnpack")) if fmt in config.export.formats]
        if quant and quant.algo == "gptq" and quant.calibration:
            _check_calibration_variety(config, model.cfg.vocab_size, report)
        precomputed = (_plan_auto(config, reference, report, grids) if quant.max_kl is not None and not quant.plan
                       else _gptq(config, reference, report, grids, memory)) if quant else {}
        artifacts, runners = [], {}
        if "onnx" in config.export.formats:
            artifacts.append(_build_onnx(config, reference, writer, report, precomputed.get("onnx"), ahead))
            runners["onnxruntime-genai"] = "genai_config.json"
            if not config.validation.enabled:  # only a failed validation's advice reads codes again
                precomputed.pop("onnx", None)
        if "pte" in config.export.formats:
            artifacts.append(_build_pte(config, reference, writer, report, precomputed.get("xnnpack")))
            runners["executorch-llm-runner"] = artifacts[-1]["path"]
        validation = headline_validation(artifacts)
        report.validation = validation
        report.memory = memory.record(report.stages, report.to_dict()["peak_rss_mb"])
        report_dict = report.to_dict()
        writer.write_json("report.json", report_dict)
        (writer.staging / "report.md").write_text(markdown(report_dict))
        manifest = {
            "build_config": config.to_dict(),
            "source": {
                "model": {"path": str(config.model.path), "sha256": source_hashes},
                "adapters": [{"path": r.path, "weight": r.weight, "sha256": r.sha256} for r in records]
                + [{"name": a.name, "path": a.path, "weight": a.weight, "sha256": a.sha256, "lora": "runtime"}
                   for a in reference.runtime_adapters],
            },
            "model": model.cfg.to_dict(),
            "build_machine": build_machine(),
            "artifacts": artifacts,
            "runners": runners,
            "validation": validation,
            "memory": report.memory,
        }
        out, manifest = writer.finish(manifest)
    except BaseException:
        writer.abort()
        raise
    finally:
        if ahead is not None:
            ahead.close()
    if writer.moved_aside:
        report.moved_aside = str(writer.moved_aside)
    if validation is not None and not validation["passed"]:
        raise CheckFailed(f"{out}: validation failed: " + "; ".join(validation["failures"])
                          + _advice(config, reference.model, precomputed.get("onnx") or precomputed.get("xnnpack"),
                                    max((a["validation"]["metrics"].get("kl_calibration", 0.0) for a in artifacts
                                         if a.get("validation")), default=0.0)))
    return out, manifest


def _prepare_runtime_lora(config: BuildConfig, reference: Reference, report: BuildReport) -> None:
    from compiler.models.lora_slots import LoraSlots

    dtype = config.lora.slot_dtype(config.export.quant is not None)
    reference.slots = LoraSlots.for_adapters(reference.model.cfg, reference.runtime_adapters, dtype,
                                             config.lora.max_rank, config.lora.targets)


def _advice(config: BuildConfig, model, gptq: dict | None, kl_calibration: float = 0.0) -> str:
    """What to try when a quantized build fails its gates (kl_calibration: the largest artifact's, with --max-kl)."""
    from compiler.quant.auto import probe_sequences
    from compiler.quant.sensitivity import largest_int4_errors, units

    quant = config.export.quant
    if not quant:
        return ""
    if quant.max_kl is None:
        sequences = probe_sequences(model, config.model.path, quant.calibration, count=2)
        blocks = {u.path: quant.block_for(u.path) for u in units(model)
                  if quant.bits_for(u.path, quant.lm_head_bits if u.path == "lm_head" else 4) == 4}
        if not blocks:
            # Nothing int4 to name; an 8-bit .pte's error is mostly XNNPACK's per-token int8 activations.
            return ("; no module is int4: build with --quant auto --max-kl 0.1, which keeps the modules that "
                    "8 bits hurt most in fp32, or keep some with --keep-fp32 REGEX")
        worst = largest_int4_errors(model, sequences, blocks, {quant.block_size: gptq or {}})
        return ("; for per-module precision that meets a KL target, build with --quant auto --max-kl 0.1 "
                f"(largest int4 errors on calibration text: {', '.join(worst)})")
    if kl_calibration > quant.max_kl:
        # The artifact rounds a little differently from the plan's PyTorch model: ask for that much less.
        return f"; try --max-kl {quant.max_kl * quant.max_kl / kl_calibration:.3g}"
    return (f"; the plan met KL {quant.max_kl} on calibration text: lower --max-kl, or pass --calibration "
            "text like your prompts")


NARROW_CALIBRATION_TOKENS = 64


def _check_calibration_variety(config: BuildConfig, vocab_size: int, report: BuildReport) -> None:
    """Warn when --calibration text has few distinct tokens: GPTQ and the channel smoothing fit the inputs
    they see (one sentence repeated failed the gates of a model that passes with the built-in text)."""
    from compiler.quant.gptq import calibration_sequences

    quant = config.export.quant
    distinct = len({t for window in calibration_sequences(config.model.path, quant.calibration, vocab_size) for t in window})
    if distinct < NARROW_CALIBRATION_TOKENS:
        report.warn(f"--calibration {quant.calibration}: only {distinct} distinct tokens; GPTQ fits the text it "
                    "sees: give varied text like your prompts, or drop --calibration for the built-in text")


def _gptq(config: BuildConfig, reference: Reference, report: BuildReport, grids: list[str],
          memory: MemoryEstimate) -> dict[str, dict]:
    """--algo gptq: GPTQ's codes per grid (onnx for the ONNX pass, xnnpack for the .pte), one calibration
    pass for both, in the windows of layers the memory plan chose; {} for other algorithms."""
    from compiler.quant.gptq import HESSIAN_BUDGET_BYTES, calibration_sequences, gptq_codes

    quant, model = config.export.quant, reference.model
    if quant.algo != "gptq":
        return {}
    sequences = calibration_sequences(config.model.path, quant.calibration, model.cfg.vocab_size)
    # Not overlapped with the export in a thread: both are dispatch-bound, and the two OpenMP
    # thread teams slowed the pair down (22 s + 8 s side by side vs 11 s + 8 s in turn here).
    log: dict[str, list[str]] = {}
    with report.stage("calibrate_gptq", f"{len(sequences)} sequences, grids {', '.join(grids)}"), reused_heap():
        with report.progress("layers", unit="layer") as progress:
            codes = gptq_codes(model, sequences, quant.bits, [(quant.block_size, g) for g in grids], quant.symmetric,
                               progress=progress, hessian_budget=memory.gptq_hessian_bytes or HESSIAN_BUDGET_BYTES,
                               smoothing=quant.smoothing, smoothing_log=log)
    _report_smoothing(report, quant.smoothing, log)
    return {grid: codes[(quant.block_size, grid)] for grid in grids}


def _report_smoothing(report: BuildReport, alpha: float, log: dict[str, list[str]]) -> None:
    """The channel smoothing's fold points, considered and smoothed, per kind (FOLD_POINTS)."""
    from compiler.quant.smooth import FOLD_POINTS

    def per_kind(names: list[str]) -> dict[str, int]:
        return {leaf.split(".")[-1]: sum(n.endswith(leaf) for n in names) for leaf in FOLD_POINTS}

    if not log.get("considered"):
        return
    report.smoothing = {"alpha": alpha, "fold_points": len(log["considered"]), "smoothed": len(log["smoothed"]),
                        "by_input": per_kind(log["smoothed"]), "considered_by_input": per_kind(log["considered"])}


def _plan_auto(config: BuildConfig, reference: Reference, report: BuildReport, grids: list[str]) -> dict[str, dict]:
    """--quant auto: choose each module's precision, record the plan in the config (so in the manifest)
    and the sensitivities in the report; returns GPTQ's codes at the plan's blocks per grid."""
    from compiler.quant.auto import plan_auto

    quant = config.export.quant
    with report.stage("quant_auto", f"per-module precision for KL <= {quant.max_kl:g} on calibration text"), \
            reused_heap():
        result = plan_auto(reference.model, config.model.path, quant, report.note, grids)
    config.export.quant = result.quant
    report.quant_auto = result.summary
    _report_smoothing(report, quant.smoothing, result.smoothing_log)
    if not result.summary["met"]:
        report.warn(f"--max-kl {quant.max_kl:g}: no plan met {result.summary['planned_for']:.4g} (the target "
                    f"with the plan's headroom) on calibration text (nearest: KL {result.summary['kl_calibration']:.4g}); "
                    "the build keeps that plan")
    return result.precomputed


def headline_validation(artifacts: list[dict]) -> dict | None:
    """The bundle's validation: the first artifact's metrics (each artifact carries its own), failed
    when any artifact failed, with every artifact's failures (named by format when there are several)."""
    results = [a["validation"] for a in artifacts if a.get("validation")]
    if not results:
        return None
    headline = dict(results[0])
    headline["passed"] = all(r["passed"] for r in results)
    headline["failures"] = [f"{a['format']}: {f}" if len(artifacts) > 1 else f
                            for a in artifacts if a.get("validation") for f in a["validation"]["failures"]]
    return headline


def _trace_ahead(config: BuildConfig, cfg, memory):
    """The ONNX export's one-layer trace, started now in a child process (trace_ahead.py), or None."""
    if "onnx" not in config.export.formats:
        return None
    from compiler.onnx import trace_ahead, trace_cache
    from compiler.onnx.export import trace_options

    headroom = None if memory.budget_mb is None else memory.budget_mb - memory.peak_mb
    return trace_ahead.start(cfg, trace_options(config.export.last_position_logits), trace_cache.default_dir(),
                             headroom)


def _build_onnx(config: BuildConfig, reference: Reference, writer: BundleWriter, report: BuildReport,
                precomputed: dict | None = None, ahead=None) -> dict:
    from compiler.onnx import trace_cache
    from compiler.onnx.export import export_onnx, io_for, save_onnx
    from compiler.onnx.genai_config import genai_config
    from compiler.onnx.passes import attention_by_layer, build_pipeline, op_counts, run_passes

    model = reference.model
    quant = config.export.quant
    with report.stage("export_onnx", f"{model.cfg.num_layers} layers, the dynamo exporter's graph"):
        onnx_model = export_onnx(model, last_position_logits=config.export.last_position_logits,
                                 trace_cache=trace_cache.default_dir(), ahead=ahead)
        release_module_pages(model)  # the template's checks read layer 0 and the tables
    traced_nodes = len(onnx_model.graph)
    traced = onnx_model.meta.get("edgec.trace")
    pipeline = config.export.pipeline
    passes = build_pipeline(pipeline, model.cfg, quant, precomputed, reference.slots)
    if passes:
        with report.stage("onnx_passes", f"pipeline '{pipeline}', {len(passes)} passes"):
            with report.progress("passes", unit="pass") as progress:
                onnx_model, report.passes = run_passes(onnx_model, passes, config.export.dump_dir, progress)
    ops = op_counts(onnx_model)
    # One buffer for past and present only when every layer's attention is GroupQueryAttention (one left as
    # MultiHeadAttention keeps its KV concat and needs past and present apart).
    shares_buffer = ops.get("GroupQueryAttention", 0) == model.cfg.num_layers
    with report.stage("write_bundle"):
        save_onnx(onnx_model, writer.staging / MODEL_FILE)
        release_module_pages(model)  # the fp32 initializers (views of the weights) were read to be written
        report.export = {
            "exporter": ("written as torch.onnx.export(dynamo=True) traces it (compiler/onnx/layer_graph.py)"
                         if traced and traced.endswith("written") else "torch.onnx.export(dynamo=True)"),
            # "one layer, written" (layer_graph.py, then stamped), "every layer, written", or where traced
            # "one layer", "one layer, traced ahead" (by a child process during the earlier stages),
            # "cached" (that trace, from an earlier build) or "every layer"
            "trace": traced,
            "pipeline": pipeline,
            "nodes_traced": traced_nodes,
            "nodes": len(onnx_model.graph),
            "op_counts": ops,
            "attention_by_layer": attention_by_layer(onnx_model, model.cfg.num_layers),
        }
        if ahead is not None:  # the child's memory is its own, beside the build's peak RSS
            report.export["trace_ahead"] = {"waited_s": round(ahead.waited_s, 2), "peak_rss_mb": ahead.peak_rss_mb}
        del onnx_model
        prompt = _write_prompt_graph(writer.staging, quant, report)
        if prompt:
            report.export["prompt_graph"] = (f"{prompt['file']}: {prompt['quantized_matmuls']} MatMulNBits at accuracy "
                                             f"level {quant.prompt_accuracy_level}, run on prompts")
        writer.write_json("genai_config.json", genai_config(model.cfg, MODEL_FILE, shares_buffer,
                                                               config.export.threads, prompt))
    io = io_for(model, config.export.last_position_logits).describe(shares_buffer)
    artifact = {"format": "onnx", "path": MODEL_FILE, "precision": config.export.precision, "pipeline": pipeline,
                "quant": quant.to_dict() if quant else None, "io": io}
    if prompt:
        artifact["prompt_graph"] = {"path": prompt["file"], "accuracy_level": quant.prompt_accuracy_level,
                                    "quantized_matmuls": prompt["quantized_matmuls"]}
    if reference.slots is not None:
        artifact["lora"] = _write_onnx_adapters(writer.staging, reference, report)
    if config.validation.enabled:
        artifact["validation"] = _validate_artifact(writer.staging, artifact, reference, config, report)
    return artifact


def _write_prompt_graph(staging: Path, quant, report: BuildReport) -> dict | None:
    """--prompt-accuracy-level: model_prompt.onnx beside model.onnx, for genai_config.json's pipeline."""
    from compiler.onnx.prompt_graph import PROMPT_FILE, write_prompt_graph

    level = quant.prompt_accuracy_level if quant else None
    if level is None:
        return None
    written = write_prompt_graph(staging / MODEL_FILE, staging / PROMPT_FILE, level)
    if not written["quantized_matmuls"]:
        report.warn(f"--prompt-accuracy-level {level}: the graph has no MatMulNBits (every linear kept fp32), "
                    "so no prompt graph was written")
        return None
    return {"file": PROMPT_FILE, **written}


def _write_onnx_adapters(staging: Path, reference: Reference, report: BuildReport) -> dict:
    from compiler.adapters import adapter_entry
    from compiler.onnx.adapter_file import adapter_path, write_onnx_adapter

    entries = []
    with report.stage("write_adapters", f"{len(reference.runtime_adapters)} .onnx_adapter file(s)"):
        for adapter in reference.runtime_adapters:
            relative = adapter_path(adapter.name)
            stats = write_onnx_adapter(staging / relative, adapter, reference.slots)
            entries.append(adapter_entry(staging, relative, adapter, stats))
    return {"mode": "runtime", "slots": reference.slots.to_dict(), "adapters": entries}


def _build_pte(config: BuildConfig, reference: Reference, writer: BundleWriter, report: BuildReport,
               precomputed: dict | None = None) -> dict:
    from compiler.executorch.export import (PTE_FILE, ExecutorchDecoder, export_pte, runner_metadata,
                                            unexpected_portable_ops)
    from compiler.executorch.quantize import quantize_decoder, unmatched_patterns

    model = reference.model
    max_seq_len = config.export.max_seq_len or min(model.cfg.max_sequence_length, DEFAULT_PTE_MAX_SEQ_LEN)
    if max_seq_len > model.cfg.max_sequence_length:
        raise UsageError(f"--max-seq-len {max_seq_len}: {config.model.path} supports at most "
                         f"{model.cfg.max_sequence_length} positions")
    quant = config.export.quant
    decoder = ExecutorchDecoder(model, max_seq_len)
    counts = {}
    if quant:
        for pattern in unmatched_patterns(decoder, quant):
            report.warn(f"--keep-fp32/--keep-int8 '{pattern}' names no module of the .pte's decoder "
                        "(its paths: model.layers.N.self_attn.qkv_proj, ...mlp.down_proj, lm_head)")
        with report.stage("quantize_pte", "torchao, int8 dynamic activations"):
            counts = quantize_decoder(decoder, quant, precomputed)
            release_module_pages(model)  # torchao holds its own int8 copies now
            if precomputed and not config.validation.enabled:
                precomputed.clear()  # torchao's tensors hold them now; only a failed validation's advice reads them
    metadata = runner_metadata(model.cfg, max_seq_len, model.cfg.bos_token_id, list(model.cfg.eos_token_ids))
    lora = None
    if reference.slots is not None:
        with report.stage("export_pte", f"{model.cfg.num_layers} layers with LoRA slots, lowered one by one, "
                                        "weights in model.ptd"), reused_heap():
            with report.progress("lowering", unit="step") as progress:
                lora, exported = _export_pte_with_lora(decoder, metadata, reference, writer.staging, progress)
            del decoder
    else:
        with report.stage("export_pte", f"{model.cfg.num_layers} layers, torch.export + XNNPACK"), reused_heap():
            with report.progress("lowering", unit="step") as progress:
                exported = export_pte(decoder, metadata, progress=progress)
            del decoder
            exported.write_program(writer.staging / PTE_FILE)
    unexpected = unexpected_portable_ops(exported.portable_ops)
    if unexpected:
        kept = ", ".join(f"{k} x{v}" for k, v in sorted(unexpected.items()))
        report.warn(f"XNNPACK cannot take these ops; they run on ExecuTorch's portable kernels (slower): {kept}")
    report.export_pte = {"export_s": round(exported.export_s, 2), "lower_s": round(exported.lower_s, 2),
                         "layers": exported.layers, "quantized": counts, "delegated": exported.delegated_ops,
                         "portable_ops": exported.portable_ops}
    artifact = {"format": "pte", "path": PTE_FILE, "precision": config.export.precision,
                "quant": {**quant.to_dict(), "algo": quant.algo if counts.get("int4_gptq") else "rtn",
                          "scheme": _pte_scheme(counts)} if quant else None,
                "max_seq_len": max_seq_len, "metadata": metadata,
                "io": {"inputs": ["tokens [1, seq] int64", "input_pos [1] int64"],
                       "outputs": ["logits [1, vocab] float32 (last position)"],
                       "kv_cache": {"in_program": True, "max_seq_len": max_seq_len, "num_layers": model.cfg.num_layers,
                                    "num_kv_heads": model.cfg.num_kv_heads, "head_dim": model.cfg.head_dim}}}
    if lora is not None:
        artifact["data_files"], artifact["lora"] = lora
    if config.validation.enabled:
        artifact["validation"] = _validate_artifact(writer.staging, artifact, reference, config, report)
    return artifact


def _export_pte_with_lora(decoder, metadata: dict, reference: Reference, staging: Path, progress):
    """model.pte + model.ptd (the foundation), a .ptd per adapter and the all-zero one (the base):
    (data files, the artifact's lora entry), the export."""
    from compiler.adapters import adapter_entry
    from compiler.executorch.lora import FOUNDATION_FILE, export_pte_with_lora, pte_slots, write_adapter_ptd
    from runtimes.executorch import BASE_ADAPTER_NAME

    lora_export = export_pte_with_lora(decoder, pte_slots(reference.slots), metadata, staging, progress)
    entries = []
    for adapter in reference.runtime_adapters:
        relative = f"{ADAPTER_DIR}/{adapter.name}.ptd"
        write_adapter_ptd(staging / relative, lora_export.slots, adapter.modules)
        entries.append(adapter_entry(staging, relative, adapter, adapter.tensor_stats()))
    base = f"{ADAPTER_DIR}/{BASE_ADAPTER_NAME}.ptd"
    write_adapter_ptd(staging / base, lora_export.slots, {})
    lora = {"mode": "runtime", "slots": reference.slots.to_dict(),
            "pte_slots": {m: list(v) for m, v in lora_export.slots.items()}, "base_adapter": base, "adapters": entries}
    return ([FOUNDATION_FILE], lora), lora_export.export


def _pte_scheme(counts: dict[str, int]) -> str:
    """'8da4w', or the mix of linear schemes a --keep-*/--lm-head-bits build made ('8da4w+8da8w+fp32')."""
    names = [("8da4w", "linear_8da4w"), ("8da8w", "linear_8da8w"), ("fp32", "linear_fp32")]
    return "+".join(name for name, key in names if any(k.startswith(key) for k in counts))


def revalidate(bundle: Path, config_overrides: dict, report: BuildReport) -> dict:
    """Run the gates again on an existing bundle against its sources (or the ones given)."""
    manifest = read_manifest(bundle)
    config = BuildConfig.from_dict(manifest["build_config"], out=bundle)
    if config_overrides.get("model"):
        config.model.path = Path(config_overrides["model"])
    if config_overrides.get("adapters"):
        config.adapters = config_overrides["adapters"]
    if config_overrides.get("gates"):
        config.validation.gate_overrides.update(config_overrides["gates"])
    if config_overrides.get("new_tokens"):
        config.validation.new_tokens = config_overrides["new_tokens"]
    if not config.model.path.is_dir():
        raise UsageError(f"{config.model.path}: source model of {bundle} not found; pass --model DIR")
    runtime_lora = config.lora.mode == "runtime"
    merged, kept_apart = ([], config.adapters) if runtime_lora else (config.adapters, [])
    reference = load_reference(config.model.path, merged, report, True, kept_apart)
    source_hashes = reference.source_hashes
    recorded = manifest["source"]["model"]["sha256"]
    changed = sorted(name for name, digest in source_hashes.items() if recorded.get(name) not in (None, digest))
    for artifact in manifest["artifacts"]:
        if config_overrides.get("format") not in (None, artifact["format"]):
            continue
        artifact["validation"] = _validate_artifact(bundle, artifact, reference, config, report)
        artifact["validation"]["source_changed_since_build"] = changed
    validation = headline_validation(manifest["artifacts"])
    manifest["validation"] = validation
    write_manifest(bundle, manifest)
    return validation
