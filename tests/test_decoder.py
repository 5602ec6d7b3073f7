"""A family feature written once in compiler/models reaches every export: Qwen3's per-head q/k RMSNorm
gives transformers' logits in the ONNX model (traced and fused) and in the .pte (where the norms run over
the packed q/k/v heads, so that the layers can be stitched)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compiler.cli import main

pytest.importorskip("executorch")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A 4-layer Qwen3 (q_norm/k_norm weights away from 1) and transformers' logits for a prompt."""
    from transformers import AutoModelForCausalLM

    from compiler.tiny_models import make_model

    directory = tmp_path_factory.mktemp("qwen3") / "model"
    make_model(directory, "qwen3", num_hidden_layers=4)
    ids = np.asarray([[3, 17, 9, 40, 22, 101, 7]])
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert type(reference).__name__ == "Qwen3ForCausalLM" and reference.model.layers[0].self_attn.q_norm is not None
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits[0].numpy()
    return directory, ids, expected


@pytest.mark.parametrize("optimize", ["none", "fuse"])
def test_qk_norm_reaches_the_onnx_model(qwen3, optimize, tmp_path):
    from runtimes.ort import OrtRuntime

    directory, ids, expected = qwen3
    result = run("build", "--model", directory, "--out", tmp_path / "b", "--format", "onnx", "--optimize", optimize,
                 "--no-validate", "--quiet")
    assert result.exit_code == 0, result.output
    runtime = OrtRuntime(tmp_path / "b")
    np.testing.assert_allclose(runtime.logits(ids)[0], expected, atol=1e-4, rtol=0)
    # Over the KV cache: a prefill of 4 tokens, then the other 3 one at a time.
    logits, past = runtime.forward(ids[:, :4], runtime.empty_cache(), 0)
    rows = [logits[0, -1]]
    for i in range(4, ids.shape[1] - 1):
        logits, past = runtime.forward(ids[:, i : i + 1], past, i)
        rows.append(logits[0, -1])
    np.testing.assert_allclose(np.stack(rows), expected[3:-1], atol=1e-4, rtol=0)


def test_qk_norm_reaches_the_pte(qwen3, tmp_path):
    from runtimes.executorch import ExecutorchRuntime

    directory, ids, expected = qwen3
    result = run("build", "--model", directory, "--out", tmp_path / "b", "--format", "pte", "--max-seq-len", 32,
                 "--no-validate", "--quiet")
    assert result.exit_code == 0, result.output
    assert "XNNPACK cannot take" not in result.output, result.output
    # Normalized as packed heads, q, k and v leave one XNNPACK partition: the middle layers are stitched.
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["export_pte"]["layers"] == "layers 0, 1, 3 lowered, 1 stitched from layer 1"
    runtime = ExecutorchRuntime(tmp_path / "b")
    np.testing.assert_allclose(runtime._run(ids, 0), expected[-1], atol=1e-4, rtol=0)
    # The in-program cache: a prefill of 4 tokens, then single steps.
    rows = [runtime._run(ids[:, :4], 0)] + [runtime._run(ids[:, i : i + 1], i) for i in range(4, ids.shape[1])]
    np.testing.assert_allclose(np.stack(rows), expected[3:], atol=1e-4, rtol=0)
