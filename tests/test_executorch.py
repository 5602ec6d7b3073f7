"""The ExecuTorch path: .pte built from tiny real checkpoints, run in ExecuTorch's runtime (Python bindings,
op libraries loaded), held against the PyTorch reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from compiler.cli import main

pytest.importorskip("executorch")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def both_formats(llama_dir, llama_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("pte") / "bundle"
    result = run("build", "--model", llama_dir, "--adapter", llama_adapter, "--out", out, "--format", "onnx,pte",
                 "--max-seq-len", 48, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_fp32_pte_with_adapter_equals_the_reference_beside_the_onnx_model(both_formats):
    manifest = json.loads((both_formats / "manifest.json").read_text())
    onnx_artifact, pte = manifest["artifacts"]
    assert (onnx_artifact["format"], pte["format"]) == ("onnx", "pte")
    for artifact in (onnx_artifact, pte):
        assert artifact["validation"]["passed"], artifact["validation"]["failures"]
    metrics = pte["validation"]["metrics"]
    assert metrics["max_abs_logits"] < 1e-4 and metrics["greedy_match"] == 1.0
    assert manifest["runners"]["executorch-llm-runner"] == "model.pte"
    report = json.loads((both_formats / "report.json").read_text())
    assert report["export_pte"]["delegated"]["xnnpack_partitions"] >= 1 and not report["warnings"]


def test_pte_follows_the_executorch_llm_runner_conventions(both_formats, llama_dir):
    from compiler.frontend.load import build_decoder, read_checkpoint
    from runtimes.executorch import ExecutorchRuntime

    runtime = ExecutorchRuntime(both_formats)
    cfg = build_decoder(read_checkpoint(llama_dir)).cfg
    assert runtime.max_seq_len == 48 and runtime.vocab_size == cfg.vocab_size
    assert runtime.metadata("use_kv_cache") is True and runtime.metadata("enable_dynamic_shape") is True
    assert runtime.metadata("get_n_layers") == cfg.num_layers
    assert list(runtime.eos_ids) == list(cfg.eos_token_ids)
    # forward(tokens [1, seq], input_pos [1]) -> last logits; a prefill and two single steps on the
    # in-program cache give what one prefill of the three chunks gives.
    ids = np.asarray([[3, 17, 9, 40, 22]])
    whole = runtime._run(ids, 0)
    runtime._run(ids[:, :3], 0)
    runtime._run(ids[:, 3:4], 3)
    np.testing.assert_allclose(runtime._run(ids[:, 4:5], 4), whole, atol=1e-4)
    with pytest.raises(ValueError, match="max_seq_len"):
        runtime._run(np.zeros((1, 8), dtype=np.int64), 44)


def test_the_runtime_keeps_torch_mkl_single_threaded_in_executorch_threads(both_formats):
    """custom_sdpa calls BLAS from ExecuTorch's threadpool threads, and in a process with torch that BLAS is
    torch's MKL, whose threaded gemv started an OpenMP region per call (a decode step 3-4x slower here). Once
    the runtime is loaded, MKL is single-threaded in threads other than torch's own, and torch keeps its
    thread count, also after running the program (which runs the calling thread's share at 1 thread)."""
    import ctypes
    import os
    import threading

    import torch

    from runtimes.executorch import ExecutorchRuntime

    try:
        mkl_max_threads = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib",
                                                   "libtorch_cpu.so")).MKL_Get_Max_Threads
    except (OSError, AttributeError):
        pytest.skip("this torch build has no MKL")
    torch_threads = torch.get_num_threads()
    runtime = ExecutorchRuntime(both_formats)
    runtime._run(np.asarray([[3, 17, 9]]), 0)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(mkl_max_threads()))
    worker.start()
    worker.join()
    assert seen == [1]
    assert torch.get_num_threads() == torch_threads and mkl_max_threads() == torch_threads


def test_int4_pte_passes_the_int4_gates(trained_dir, tmp_path):
    out = tmp_path / "int4"
    result = run("build", "--model", trained_dir, "--out", out, "--format", "pte", "--quant", "int4",
                 "--block-size", 32, "--embedding-bits", 8, "--max-seq-len", 64, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    (pte,) = manifest["artifacts"]
    assert pte["quant"]["scheme"] == "8da4w" and pte["validation"]["passed"]
    assert pte["quant"]["algo"] == "gptq"
    assert {g["metric"] for g in pte["validation"]["gates"]} == {"kl_mean", "top1_agreement", "perplexity_ratio"}
    report = json.loads((out / "report.json").read_text())
    assert report["export_pte"]["quantized"] == {"linear_8da4w_group32": 5 * 2 + 1, "int4_gptq": 5 * 2 + 1,
                                                 "embedding_int8": 1}
    fp32_bytes = sum(4 * n for n in [128 * 512, 2 * (3 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256)])
    assert (out / "model.pte").stat().st_size < 0.45 * fp32_bytes


def test_keep_fp32_keep_int8_and_an_int8_lm_head_in_the_pte(trained_dir, tmp_path):
    """The ONNX path's module-path patterns: layer 0's attention stays fp32, the down projections and the
    lm_head (by pattern, over --lm-head-bits 4) are 8da8w (int8 weights per channel), the rest 8da4w, and
    the program still passes the gates. A pattern naming no module (q_proj is packed here) is a warning."""
    out = tmp_path / "mixed"
    result = run("build", "--model", trained_dir, "--out", out, "--format", "pte", "--quant", "int4",
                 "--block-size", 32, "--embedding-bits", 8, "--max-seq-len", 64, "--quiet", "--lm-head-bits", 4,
                 "--keep-fp32", r"^model\.layers\.0\.self_attn\.", "--keep-fp32", r"self_attn\.q_proj",
                 "--keep-int8", r"mlp\.down_proj", "--keep-int8", "^lm_head$")
    assert result.exit_code == 0, result.output
    assert "warning: --keep-fp32/--keep-int8 'self_attn\\.q_proj' names no module" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["export_pte"]["quantized"] == {"linear_fp32": 2, "linear_8da8w_channel": 3,
                                                 "linear_8da4w_group32": 6, "int4_gptq": 6, "embedding_int8": 1}
    assert report["export_pte"]["delegated"]["xnnpack_partitions"] == 4
    (pte,) = json.loads((out / "manifest.json").read_text())["artifacts"]
    assert pte["quant"]["scheme"] == "8da4w+8da8w+fp32" and pte["validation"]["passed"]


def test_gptq_codes_on_the_xnnpack_grid_are_what_the_pte_linears_hold(trained_dir):
    """GPTQ's codes and scales reach torchao's int4 weights as they are (positive scales, which XNNPACK
    requires, already bfloat16 values, which it stores), q/k/v stacked into the packed qkv_proj."""
    import torch

    from compiler.config import QuantConfig
    from compiler.executorch.export import ExecutorchDecoder
    from compiler.executorch.quantize import quantize_decoder
    from compiler.frontend.load import build_decoder, read_checkpoint
    from compiler.quant.gptq import calibration_sequences, codes_for, gptq_codes

    model = build_decoder(read_checkpoint(trained_dir))
    sequences = calibration_sequences(trained_dir, None, model.cfg.vocab_size, count=2)
    codes = gptq_codes(model, sequences, 4, [(32, "onnx"), (32, "xnnpack")], True)
    onnx_codes, pte_codes = codes[(32, "onnx")], codes[(32, "xnnpack")]
    assert set(onnx_codes) == set(pte_codes) and all(s.min() > 0 for _, s, _ in pte_codes.values())
    assert any(s.min() < 0 for _, s, _ in onnx_codes.values())  # MLAS's grid: the signed maximum maps to -8
    decoder = ExecutorchDecoder(model, 32)
    counts = quantize_decoder(decoder, QuantConfig(block_size=32), pte_codes)
    assert counts["int4_gptq"] == counts["linear_8da4w_group32"] == 5 * 2 + 1
    for name in ("layers.1.self_attn.qkv_proj", "layers.0.mlp.down_proj", "lm_head"):
        weight = decoder.get_submodule(name).weight
        q, scales, _ = codes_for(pte_codes, name if name == "lm_head" else f"model.{name}")
        assert torch.equal(weight.scale, torch.from_numpy(scales))
        assert torch.equal(weight.scale.to(torch.bfloat16).float(), weight.scale)
        assert torch.equal(weight.qdata.int() + 8, torch.from_numpy(q.reshape(weight.qdata.shape)).int())


@pytest.mark.parametrize("config_name", ["8da4w", "8da8w", "embedding int8", "embedding int4"])
def test_quantizing_in_row_chunks_equals_torchao_on_the_whole_weight(monkeypatch, config_name):
    """Tables are quantized a few rows at a time (their temporaries were a 1B build's peak): the same
    tensor as torchao's quantize_ over the whole weight, here with chunks of 7 rows and a short last one."""
    import torch
    from torch import nn
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    import compiler.executorch.quantize as pte_quantize

    config, make = {
        "8da4w": (Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
                  lambda: nn.Linear(64, 30, bias=False)),
        "8da8w": (Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
                  lambda: nn.Linear(64, 30, bias=False)),
        "embedding int8": (IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)), lambda: nn.Embedding(30, 64)),
        "embedding int4": (IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)), lambda: nn.Embedding(30, 64)),
    }[config_name]
    torch.manual_seed(0)
    whole, chunked = make(), make()
    chunked.load_state_dict(whole.state_dict())
    quantize_(whole, config, filter_fn=lambda m, fqn: True)
    monkeypatch.setattr(pte_quantize, "ROWS_PER_CHUNK", 7)
    pte_quantize._quantize_in_row_chunks(chunked, config)
    assert type(chunked.weight) is type(whole.weight) and chunked.weight.shape == whole.weight.shape
    for name in whole.weight.tensor_data_names:
        assert torch.equal(getattr(chunked.weight, name), getattr(whole.weight, name)), name
    for name in whole.weight.tensor_attribute_names:
        assert getattr(chunked.weight, name) == getattr(whole.weight, name), name
    x = torch.randint(0, 30, (5,)) if isinstance(whole, nn.Embedding) else torch.randn(5, 64)
    assert torch.equal(chunked(x), whole(x))


def test_a_linear_whose_int4_group_xnnpack_refuses_is_int8_instead(tmp_path):
    """K = 80: the largest power-of-two block dividing it is 16, which XNNPACK's int4 linear refuses (groups
    must be multiples of 32): that linear is 8-bit per channel instead of failing the export."""
    from compiler.config import QuantConfig
    from compiler.executorch.export import ExecutorchDecoder
    from compiler.executorch.quantize import quantize_decoder
    from compiler.frontend.load import build_decoder, read_checkpoint
    from compiler.tiny_models import make_model

    make_model(tmp_path / "m", "llama", tokenizer=False, intermediate_size=80)
    decoder = ExecutorchDecoder(build_decoder(read_checkpoint(tmp_path / "m")), 32)
    counts = quantize_decoder(decoder, QuantConfig(algo="rtn", block_size=32))
    assert counts["linear_8da8w_channel"] == 2  # each layer's down_proj (K = 80)
    assert counts["linear_8da4w_group32"] == 2 * 4 + 1  # qkv, o, gate, up per layer, and the lm_head


def test_layers_quantized_differently_are_not_stitched(tmp_path):
    """Stitched copies reuse layer 1's lowered program (which holds the next layer's q/k/v), so layers
    1 .. n-2 must be laid out alike, and the last one in its q/k/v; layer 0 is lowered on its own."""
    from compiler.build import load_reference
    from compiler.config import QuantConfig
    from compiler.executorch import export
    from compiler.executorch.quantize import quantize_decoder
    from compiler.executorch.stitch import StitchError, check_uniform_layers
    from compiler.tiny_models import make_model
    from compiler.report import BuildReport

    make_model(tmp_path / "model", "llama", num_hidden_layers=4)
    model = load_reference(tmp_path / "model", [], BuildReport(quiet=True)).model
    for keep, uniform in (({}, True), ({"keep_fp32": (r"layers\.0\.",)}, True), ({"keep_fp32": (r"layers\.3\.mlp",)}, True),
                          ({"keep_int8": (r"layers\.2\.mlp",)}, False), ({"keep_fp32": (r"layers\.3\.",)}, False)):
        decoder = export.ExecutorchDecoder(model, 32)
        quantize_decoder(decoder, QuantConfig(algo="rtn", block_size=32, **keep))
        if uniform:
            check_uniform_layers(decoder)
        else:
            with pytest.raises(StitchError, match="layers are quantized differently"):
                check_uniform_layers(decoder)
    # export_pte lowers every layer on a StitchError from this check: test_stitched_layers_compute_what_...


def test_ops_xnnpack_cannot_take_are_named_in_a_warning(llama_dir, tmp_path, monkeypatch):
    """RMSNorm written with mean() (XNNPACK's mean takes only 4-D inputs) stays on portable kernels."""
    from compiler.executorch import export

    monkeypatch.setattr(export, "_compute_norms_with_linear_means", lambda decoder: None)
    out = tmp_path / "pte"
    result = run("build", "--model", llama_dir, "--out", out, "--format", "pte", "--max-seq-len", 32, "--quiet",
                 "--no-validate")
    assert result.exit_code == 0, result.output
    assert "warning: XNNPACK cannot take these ops" in result.output and "aten_mean_dim" in result.output


@pytest.mark.parametrize("args, fragment", [
    (["--max-seq-len", 100000], "--max-seq-len 100000"),
    (["--quant", "int4", "--asymmetric"], "--format pte supports --quant int4 with symmetric blocks"),
    (["--quant", "int4", "--accuracy-level", "1"], "--accuracy-level 1: --format pte computes with int8 activations"),
])
def test_bad_pte_options_are_one_line_errors(llama_dir, tmp_path, args, fragment):
    out = tmp_path / "bad"
    result = run("build", "--model", llama_dir, "--out", out, "--format", "pte", "--quiet", *args)
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_edgec_bench_runs_the_pte_in_executorch_at_several_depths(both_formats):
    result = run("bench", both_formats, "--format", "pte", "--prompt-tokens", 8, "--new-tokens", 4, "--repeats", 1,
                 "--warmup", 0, "--depths", "0,16", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    bench = json.loads(result.output)
    assert bench["runtime"]["name"] == "executorch" and bench["bundle"]["format"] == "pte"
    assert [d["depth"] for d in bench["by_depth"]] == [0, 16]
    assert all(d["decode_tokens_per_s"] > 0 for d in bench["by_depth"]) and bench["peak_rss_mb"] > 0
    too_deep = run("bench", both_formats, "--format", "pte", "--depths", "40", "--prompt-tokens", 8, "--new-tokens", 4)
    assert too_deep.exit_code == 2 and "48" in too_deep.output, too_deep.output


def test_inspect_and_validate_read_both_artifacts(both_formats):
    inspect = run("inspect", both_formats)
    assert inspect.exit_code == 0, inspect.output
    assert "model.pte (pte, fp32; KV cache in the program, 48 positions)" in inspect.output
    assert "get_max_seq_len=48" in inspect.output
    validate = run("validate", both_formats, "--json")
    assert validate.exit_code == 0, validate.output
    manifest = json.loads((both_formats / "manifest.json").read_text())
    assert [a["validation"]["passed"] for a in manifest["artifacts"]] == [True, True]
    assert manifest["artifacts"][1]["validation"]["metrics"]["max_abs_logits"] < 1e-4


def test_the_stock_executorch_llm_runner_generates_what_pytorch_generates(trained_dir, tmp_path):
    """ExecuTorch's own TextLLMRunner (the C++ runner behind llama_main and the Android demo app, through its
    Python binding) loads the program and the bundle's tokenizer.json and decodes greedily."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    from tokenizers import Tokenizer

    from compiler.frontend.load import build_decoder, read_checkpoint
    from compiler.validate import torch_greedy
    from runtimes.executorch import load_op_libraries

    out = tmp_path / "pte"
    result = run("build", "--model", trained_dir, "--out", out, "--format", "pte", "--max-seq-len", 64, "--quiet",
                 "--no-validate")
    assert result.exit_code == 0, result.output
    load_op_libraries()
    prompt = "The quick brown fox"
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    reference = torch_greedy(build_decoder(read_checkpoint(trained_dir)),
                             tokenizer.encode(prompt, add_special_tokens=False).ids, 8)
    pieces = []
    runner = TextLLMRunner(str(out / "model.pte"), str(out / "tokenizer.json"))
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=8, temperature=0.0), pieces.append)
    assert "".join(pieces) == tokenizer.decode(reference) and len(pieces) >= 4


def test_rope_tables_are_the_correctly_rounded_cos_and_sin_of_the_reference_angles(llama_dir):
    """Every entry of the program's 2048-position rope tables is cos/sin of the reference's fp32 angle,
    computed in float64 and rounded once (torch's fp32 cos is not; docs/investigations.md)."""
    import math

    import torch

    from compiler.build import load_reference
    from compiler.executorch.export import ExecutorchDecoder
    from compiler.report import BuildReport

    model = load_reference(llama_dir, [], BuildReport(quiet=True)).model
    decoder = ExecutorchDecoder(model, 2048)
    rotary = model.cfg.rotary_dim or model.cfg.head_dim
    angles = (torch.arange(2048, dtype=torch.float32)[:, None] * model.rope_inv_freq[None, :]).tolist()
    scaling = model.cfg.rope_attention_scaling
    for table, fn in ((decoder.rope_cos, math.cos), (decoder.rope_sin, math.sin)):
        half = torch.tensor([[fn(a) * scaling for a in row] for row in angles], dtype=torch.float64).float()
        assert torch.equal(table[:, :rotary], torch.cat((half, half), dim=-1))


def _four_layer_reference(tmp_path, family):
    from compiler.build import load_reference
    from compiler.report import BuildReport
    from compiler.tiny_models import make_model

    make_model(tmp_path / "model", family, num_hidden_layers=4)
    return load_reference(tmp_path / "model", [], BuildReport(quiet=True)).model


# Prefill, one decode step at 5 and two tokens at 6: the stitched layers' own KV caches are read back.
STITCH_CALLS = ((np.asarray([[3, 17, 9, 40, 22]]), 0), (np.asarray([[3]]), 5), (np.asarray([[17, 9]]), 6))


def _run_program(tmp_path, name, exported):
    from runtimes.executorch import ExecutorchRuntime

    path = tmp_path / f"{name}.pte"
    exported.write_program(path)
    runtime = ExecutorchRuntime(tmp_path, path)
    return [runtime._run(ids, start) for ids, start in STITCH_CALLS]


def test_stitched_layers_compute_what_lowering_every_layer_computes(tmp_path, monkeypatch):
    """A 4-layer int4 model lowered as the template (0, 1, 3) with layers 1 and 2 stitched from its middle
    layer gives, bit for bit, the logits of the program lowered layer by layer. The whole-model program
    comes from the fallback a StitchError takes (the same lowering as `reuse_layers=False`)."""
    from compiler.config import QuantConfig
    from compiler.executorch import export
    from compiler.executorch.quantize import quantize_decoder
    from compiler.executorch.stitch import StitchError

    model = _four_layer_reference(tmp_path, "llama")
    logits, counts, layers = {}, {}, {}
    for stitched in (True, False):
        decoder = export.ExecutorchDecoder(model, 32)
        quantize_decoder(decoder, QuantConfig(algo="rtn", block_size=32, embedding_bits=8))
        if not stitched:
            def refuse(*args):
                raise StitchError("refused by the test")
            monkeypatch.setattr(export, "check_uniform_layers", refuse)
        exported = export.export_pte(decoder, export.runner_metadata(model.cfg, 32, 1, [2]))
        logits[stitched] = _run_program(tmp_path, f"stitched-{stitched}", exported)
        counts[stitched], layers[stitched] = exported.delegated_ops, exported.layers
    for mine, whole in zip(logits[True], logits[False]):
        np.testing.assert_array_equal(mine, whole)
    assert counts[True]["xnnpack_partitions"] == counts[False]["xnnpack_partitions"] == 6
    assert counts[True]["reused_partitions"] >= 2 and counts[False]["reused_partitions"] == 0
    assert layers[True] == "layers 0, 1, 3 lowered, 1 stitched from layer 1"
    assert layers[False] == "every layer lowered: stitching not possible (refused by the test)"


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_stitched_layers_carry_their_own_biases_and_norms(family, tmp_path):
    """Stitched copies of layer 1 bind each layer's own q/k/v biases (qwen2) and per-head q/k norms (qwen3):
    the fp32 program computes what the decoder computes in torch. (Lowering every layer as well, for a
    bit-for-bit comparison, doubles the test's time; the llama test above makes that comparison.)"""
    import torch

    from compiler.executorch import export

    model = _four_layer_reference(tmp_path, family)
    exported = export.export_pte(export.ExecutorchDecoder(model, 32), export.runner_metadata(model.cfg, 32, 1, [2]))
    assert exported.layers == "layers 0, 1, 3 lowered, 1 stitched from layer 1"
    eager = export.ExecutorchDecoder(model, 32)
    with torch.no_grad():
        expected = [eager(torch.from_numpy(ids), torch.tensor([start])).numpy() for ids, start in STITCH_CALLS]
    for mine, theirs in zip(_run_program(tmp_path, "stitched", exported), expected):
        np.testing.assert_allclose(mine.reshape(theirs.shape), theirs, atol=1e-4)


def test_int4_packing_makes_xnnpacks_bytes():
    """edgec's nibble packing of int4 weights gives XNNPACK's own bytes (odd widths padded, 3-D squeezed) and
    refuses values outside int4."""
    import torch
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor

    from compiler.executorch.preprocess_cache import packed_int4

    generator = torch.Generator().manual_seed(0)
    for shape in [(64, 96), (7, 9), (3, 1, 6), (1, 5)]:
        values = torch.randint(-8, 8, shape, dtype=torch.int8, generator=generator)
        assert torch.equal(packed_int4(values), NodeVisitor.convert_to_qc4w(values))
    with pytest.raises(ValueError, match="outside"):
        packed_int4(torch.tensor([[8, 0]], dtype=torch.int8))


@pytest.mark.parametrize("reuse_layers", [True, False])
def test_delegate_output_shapes_shared_between_equal_partitions_give_the_same_program(reuse_layers, tmp_path,
                                                                                      monkeypatch):
    """to_executorch's shape propagation takes the delegate outputs' shapes of equal partitions from the first
    of them (stitched or with every layer lowered), and the program is the same bytes as when every delegate
    call runs its partition on fake tensors."""
    import contextlib

    from compiler.config import QuantConfig
    from compiler.executorch import export
    from compiler.executorch.quantize import quantize_decoder

    model = _four_layer_reference(tmp_path, "llama")
    reports = {}
    for sharing in (True, False):
        if not sharing:
            monkeypatch.setattr(export, "shared_delegate_shapes", lambda stats: contextlib.nullcontext())
        decoder = export.ExecutorchDecoder(model, 32)
        quantize_decoder(decoder, QuantConfig(algo="rtn", block_size=32, embedding_bits=8))
        exported = export.export_pte(decoder, export.runner_metadata(model.cfg, 32, 1, [2]), reuse_layers=reuse_layers)
        reports[sharing] = exported.delegated_ops
        exported.write_program(tmp_path / f"{sharing}.pte")
    assert (tmp_path / "True.pte").read_bytes() == (tmp_path / "False.pte").read_bytes()
    # 4 layers: 5 partitions, the 3 between two layers' attentions equal
    assert reports[True]["reused_delegate_shapes"] >= 2 and reports[False]["reused_delegate_shapes"] == 0


@pytest.mark.parametrize("reuse_layers", [True, False])
def test_xnnpack_passes_with_nothing_to_match_are_left_out_for_the_same_program(reuse_layers, tmp_path, monkeypatch):
    """The delegate passes for convolutions, batch norms, PReLU, upsampling and the SDPA pattern are left
    out of a decoder's partitions (none of those operators in them), stitched or with every layer lowered,
    and the program is the same bytes as with every pass; a program with a convolution keeps the
    convolution pass."""
    import torch
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    from compiler.config import QuantConfig
    from compiler.executorch import export, preprocess_cache
    from compiler.executorch.quantize import quantize_decoder

    model = _four_layer_reference(tmp_path, "llama")
    ran: dict[bool, list] = {True: [], False: []}
    every_pass = preprocess_cache.passes_with_work
    for skipping in (True, False):
        def recorded(passes, program, skipping=skipping):
            kept = every_pass(passes, program) if skipping else list(passes)
            ran[skipping].append([p.__name__ for p in kept])
            return kept
        monkeypatch.setattr(preprocess_cache, "passes_with_work", recorded)
        decoder = export.ExecutorchDecoder(model, 32)
        quantize_decoder(decoder, QuantConfig(algo="rtn", block_size=32, embedding_bits=8))
        exported = export.export_pte(decoder, export.runner_metadata(model.cfg, 32, 1, [2]), reuse_layers=reuse_layers)
        exported.write_program(tmp_path / f"{skipping}.pte")
    assert (tmp_path / "True.pte").read_bytes() == (tmp_path / "False.pte").read_bytes()
    left_out = {"ConvertToUpsampleBilinear2d", "ConvertToSDPAPass", "FuseBatchNormPass", "DecomposeBatchNorm",
                "Conv1dUnsqueezePass", "PReLUReshapePass"}
    assert ran[True] and all(not left_out & set(names) for names in ran[True])
    assert all(left_out <= set(names) for names in ran[False])

    convolution = torch.export.export(torch.nn.Conv1d(2, 2, 3), (torch.randn(1, 2, 8),)).run_decompositions()
    kept = [p.__name__ for p in every_pass(XNNPACKPassManager(convolution).passes, convolution)]
    assert "Conv1dUnsqueezePass" in kept and "PReLUReshapePass" not in kept
