"""--prompt-accuracy-level: a second ONNX graph for prompts, run by onnxruntime-genai's pipeline and by edgec's
own runner, on the one weights file and one KV cache."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from compiler.cli import main
from runtimes.ort import OrtRuntime


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def accuracy_levels(path) -> set[int]:
    model = onnx.load(str(path), load_external_data=False)
    return {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "accuracy_level"}


@pytest.fixture(scope="module")
def bundle(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prompt-graph") / "bundle"
    result = run("build", "--model", trained_dir, "--out", out, "--quiet", "--quant", "int4", "--algo", "rtn",
                 "--prompt-accuracy-level", "1", "--new-tokens", "8")
    assert result.exit_code == 0, result.output
    return out


def test_bundle_carries_both_graphs_on_one_weights_file(bundle):
    assert accuracy_levels(bundle / "model.onnx") == {4}
    assert accuracy_levels(bundle / "model_prompt.onnx") == {1}
    assert sorted(p.name for p in bundle.glob("*.data")) == ["model.onnx.data"]
    prompt_graph = onnx.load(str(bundle / "model_prompt.onnx"), load_external_data=False)
    locations = {entry.value for tensor in prompt_graph.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    assert locations == {"model.onnx.data"}

    manifest = json.loads((bundle / "manifest.json").read_text())
    artifact = manifest["artifacts"][0]
    assert artifact["prompt_graph"] == {"path": "model_prompt.onnx", "accuracy_level": 1, "quantized_matmuls": 5 * 2 + 1}
    assert "model_prompt.onnx" in manifest["files"]
    assert artifact["validation"]["passed"]
    assert "model_prompt.onnx: 11 MatMulNBits at accuracy level 1" in (bundle / "report.md").read_text()

    config = json.loads((bundle / "genai_config.json").read_text())["model"]
    assert config["type"] == "decoder-pipeline"
    stages = [(name, stage) for entry in config["decoder"]["pipeline"] for name, stage in entry.items()]
    assert [(name, s["filename"], s["run_on_prompt"], s["run_on_token_gen"]) for name, s in stages] == [
        ("prompt", "model_prompt.onnx", True, False), ("tokens", "model.onnx", False, True)]


def test_runner_runs_prompts_on_the_prompt_graph_and_tokens_on_the_model(bundle):
    runner = OrtRuntime(bundle)
    assert runner.runtime_facts()["prompt_graph"] == "model_prompt.onnx"
    ids = np.array([[1, 17, 40, 23, 9, 31, 12]])

    def feeds(tokens):
        empty = {value.name: tensor for value, tensor in zip(runner.past_inputs, runner.empty_cache())}
        return runner._position_feeds(tokens, 0) | empty

    def logits_of(graph, tokens):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(str(bundle / graph), options).run(["logits"], feeds(tokens))[0]

    # The two graphs' kernels round differently; each run must land on its own graph's side of that gap.
    for tokens, graph, other in ((ids, "model_prompt.onnx", "model.onnx"), (ids[:, :1], "model.onnx", "model_prompt.onnx")):
        expected, apart = logits_of(graph, tokens), logits_of(other, tokens)
        got, _ = runner._run(tokens, runner.empty_cache(), 0)
        gap = np.abs(expected - apart).max()
        assert gap > 1e-3 and np.abs(got - expected).max() < 0.1 * gap


def test_onnxruntime_genai_runs_prompts_and_later_turns_on_the_prompt_graph(bundle):
    """genai's logits after each multi-token append (a prompt, then a second turn) are the prompt graph's, as
    edgec's runner computes them, and not model.onnx's (the two kernels round differently)."""
    og = pytest.importorskip("onnxruntime_genai")
    config = og.Config(str(bundle))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 2}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64)
    generator = og.Generator(model, params)
    turns = [[1, 17, 40, 23, 9, 31, 12], [44, 45, 46]]
    genai = []
    for turn in turns:
        generator.append_tokens(np.asarray(turn, dtype=np.int32))
        genai.append(np.asarray(generator.get_logits()).reshape(-1))

    def runner_logits(runner):
        step, done, out = runner.start_sequence(64), 0, []
        for turn in turns:
            out.append(step(np.asarray([turn]), done))
            done += len(turn)
        return out

    runner = OrtRuntime(bundle, threads=2)
    ours = runner_logits(runner)
    runner.prompt_session = runner.session  # the same runs on model.onnx alone
    tokens_graph = runner_logits(runner)
    for got, prompt_graph, model_graph in zip(genai, ours, tokens_graph):
        apart = np.abs(prompt_graph - model_graph).max()
        assert apart > 1e-3 and np.abs(got - prompt_graph).max() < 0.1 * apart


def test_onnxruntime_genai_generates_as_edgec_does(bundle):
    pytest.importorskip("onnxruntime_genai")
    from runtimes.genai import GenaiRuntime

    genai = GenaiRuntime(bundle, threads=2)
    prompt = genai.encode("The quick brown fox")
    tokens = genai.generate(prompt, 12)
    assert tokens == OrtRuntime(bundle, threads=2).generate(prompt, 12, eos_ids=(2,)) and tokens


@pytest.mark.parametrize("extra, fragments", [
    (["--prompt-accuracy-level", "1"], ["--prompt-accuracy-level 1", "--quant int4"]),
    (["--quant", "int4", "--prompt-accuracy-level", "4"], ["--prompt-accuracy-level 4", "--accuracy-level 4"]),
    (["--quant", "int4", "--accuracy-level", "1", "--prompt-accuracy-level", "0"],
     ["--prompt-accuracy-level 0", "--accuracy-level 1", "fp32"]),
    (["--quant", "int4", "--format", "pte", "--prompt-accuracy-level", "1"], ["--prompt-accuracy-level 1", "--format onnx"]),
    (["--quant", "int4", "--lora", "runtime", "--prompt-accuracy-level", "1"], ["--prompt-accuracy-level 1", "--lora runtime"]),
])
def test_bad_combinations_are_one_line_errors(trained_dir, tmp_path, extra, fragments):
    result = run("build", "--model", trained_dir, "--out", tmp_path / "out", "--quiet", *extra)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert all(f in lines[0] for f in fragments), lines[0]
    assert not (tmp_path / "out").exists()


def test_bench_names_the_prompt_graph_and_counts_its_weights(bundle):
    table = run("bench", bundle, "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1")
    assert table.exit_code == 0, table.output
    assert "prompts on model_prompt.onnx" in table.output
    from devices.bench import memory_estimate_mb
    from runtimes.base import BenchSpec

    manifest = json.loads((bundle / "manifest.json").read_text())
    artifact = manifest["artifacts"][0]
    weights = sum(f["bytes"] for name, f in manifest["files"].items() if name.startswith("model.onnx"))
    assert memory_estimate_mb(manifest, artifact, BenchSpec())["weights_mb"] == 2 * weights / 2**20
