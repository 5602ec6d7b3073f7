"""Bad input: one line naming the file or value, exit 2 for usage errors and 1 for failed checks, no traceback."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.cli import main
from compiler.tiny_models import make_adapter, make_model


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def build(model, out, *extra):
    return run("build", "--model", model, "--out", out, "--quiet", *extra)


def test_missing_model_dir(tmp_path):
    assert_one_line_error(build(tmp_path / "nope", tmp_path / "out"), 2, "nope", "does not exist")


def test_empty_model_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(build(tmp_path / "empty", tmp_path / "out"), 2, "empty", "is empty")


def test_unsupported_architecture(tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    result = build(model, tmp_path / "out")
    assert_one_line_error(result, 2, "config.json", "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM")


class _Tripwire:
    """Unpickling this creates a file: the test proves edgec never unpickles."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_only_checkpoint_is_refused_without_unpickling(llama_dir, tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    shutil.copy(llama_dir / "config.json", model / "config.json")
    tripwire = tmp_path / "unpickled"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(tripwire)))
    assert_one_line_error(build(model, tmp_path / "out"), 2, "pytorch_model.bin", "never unpickles")
    assert not tripwire.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(llama_dir, tmp_path, damage):
    model = tmp_path / "damaged"
    shutil.copytree(llama_dir, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    assert_one_line_error(build(model, tmp_path / "out"), 2, "model.safetensors", "corrupt or truncated")


def test_adapter_for_another_family_names_the_module(llama_dir, model_dir, tmp_path):
    adapter = make_adapter(model_dir("phi3"), tmp_path / "phi3-lora", target_modules=["qkv_proj"])
    result = build(llama_dir, tmp_path / "out", "--adapter", adapter)
    assert_one_line_error(result, 2, "phi3-lora", "qkv_proj", "absent")


def test_adapter_shape_mismatch_names_module_and_shapes(llama_dir, tmp_path):
    other = tmp_path / "wider"
    make_model(other, "llama", hidden_size=96, num_attention_heads=4, num_key_value_heads=2, tokenizer=False)
    adapter = make_adapter(other, tmp_path / "wide-lora", target_modules=["q_proj"])
    result = build(llama_dir, tmp_path / "out", "--adapter", adapter)
    assert_one_line_error(result, 2, "wide-lora", "q_proj", "(4, 96)", "(64, 64)", "another base")


def test_non_lora_adapter_type(llama_dir, llama_adapter, tmp_path):
    adapter = tmp_path / "ia3"
    shutil.copytree(llama_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert_one_line_error(build(llama_dir, tmp_path / "out", "--adapter", adapter), 2, "adapter_config.json", "IA3", "LoRA")


def test_dora_adapter_is_refused(llama_dir, llama_adapter, tmp_path):
    adapter = tmp_path / "dora"
    shutil.copytree(llama_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert_one_line_error(build(llama_dir, tmp_path / "out", "--adapter", adapter), 2, "DoRA")


def test_missing_adapter_weights(llama_dir, llama_adapter, tmp_path):
    adapter = tmp_path / "noweights"
    shutil.copytree(llama_adapter, adapter)
    (adapter / "adapter_model.safetensors").unlink()
    assert_one_line_error(build(llama_dir, tmp_path / "out", "--adapter", adapter), 2, "noweights", "adapter_model.safetensors")


def test_corrupt_adapter_weights(llama_dir, llama_adapter, tmp_path):
    adapter = tmp_path / "corrupt"
    shutil.copytree(llama_adapter, adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_one_line_error(build(llama_dir, tmp_path / "out", "--adapter", adapter), 2, "adapter_model.safetensors", "corrupt")


def test_missing_adapter_dir(llama_dir, tmp_path):
    assert_one_line_error(build(llama_dir, tmp_path / "out", "--adapter", tmp_path / "gone:0.5"), 2, "gone", "does not exist")


def test_output_dir_with_user_files_is_refused(llama_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    assert_one_line_error(build(llama_dir, out), 2, "mine", "not an edgec bundle", "--force")
    assert (out / "thesis.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["bench", "B", "--new-tokens", "-1"], "--new-tokens"),
        (["bench", "B", "--prompt-tokens", "0"], "--prompt-tokens"),
        (["build", "--model", "M", "--out", "O", "--format", "tflite"], "tflite"),
        (["build", "--model", "M", "--out", "O", "--gate", "speed=3"], "speed"),
        (["build", "--model", "M", "--out", "O", "--gate", "kl_mean"], "kl_mean"),
    ],
)
def test_invalid_cli_values(args, fragment):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_not_a_bundle(tmp_path):
    for command in ("inspect", "validate", "bench"):
        assert_one_line_error(run(command, tmp_path), 2, str(tmp_path), "not an edgec bundle")


def test_console_script_prints_no_traceback_and_debug_does(tmp_path):
    edgec = Path(sys.executable).with_name("edgec")
    command = [str(edgec), "build", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    errors = [line for line in plain.stderr.splitlines() if line.startswith("edgec: error:")]
    assert len(errors) == 1 and "nope" in errors[0]
    debug = subprocess.run([str(edgec), "--debug", *command[1:]], capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
