"""int4 quality on a trained model: edgec per algorithm and block size against the GenAI builder's int4.

Perplexity, KL to fp32 and top-1 agreement on held-out text, for a small Llama trained on the stdlib's sources:

    python -m benchmarks.quality_trained [--work DIR] [--train-steps N]
"""

from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import BIN, CACHE, EDGEC, argument_parser, print_table, run
from compiler.config import QuantConfig
from runtimes.ort import OrtRuntime
from runtimes.validation import logit_metrics, next_token_nll

# Random weights say nothing about quantization quality (30 random layers drift even at int8), so the model is
# trained (once, then cached) on text every machine has: the Python standard library's sources.
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=True,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5)
WINDOW = 128
ALGOS = ("rtn", "clip", "gptq")


def corpus() -> tuple[str, str]:
    """Standard-library sources, split by file into train and held-out text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))
    texts = [p.read_text(errors="ignore") for p in files]
    held_out = "".join(texts[::10])
    train = "".join(t for i, t in enumerate(texts) if i % 10)
    return train, held_out


def train_model(directory: Path, steps: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    train_text, _ = corpus()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=MODEL["vocab_size"], special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([train_text[i:i + 100_000] for i in range(0, len(train_text), 100_000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    ids = torch.tensor(tok.encode(train_text[:6_000_000]).ids)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"], **MODEL)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    started = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - WINDOW - 1, (8,))
        batch = torch.stack([ids[s:s + WINDOW] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(f"  step {step} loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    model.save_pretrained(str(directory))


def eval_windows(directory: Path, count: int = 24) -> list[list[int]]:
    from tokenizers import Tokenizer

    _, held_out = corpus()
    ids = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(held_out[:400_000]).ids
    step = (len(ids) - WINDOW) // count
    return [ids[i * step:i * step + WINDOW] for i in range(count)]


def metrics(logits: list[np.ndarray], reference: list[np.ndarray], windows: list[list[int]]) -> dict:
    """Means over the windows of edgec's own validation metrics (windows are of equal length)."""
    per_window = [logit_metrics(ref, art) for art, ref in zip(logits, reference)]
    nll = [next_token_nll(art, ids) for art, ids in zip(logits, windows)]
    return {"kl": float(np.mean([m["kl_mean"] for m in per_window])),
            "top1": float(np.mean([m["top1_agreement"] for m in per_window])), "ppl": float(np.exp(np.mean(nll)))}


def main() -> None:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--work", type=Path, default=CACHE / "bench-quality")
    parser.add_argument("--train-steps", type=int, default=600)
    args = parser.parse_args()
    model_dir = args.work / f"stdlib-llama-{args.train_steps}"
    if not (model_dir / "model.safetensors").exists():
        print(f"training a small Llama on the standard library's sources ({args.train_steps} steps) ...", flush=True)
        train_model(model_dir, args.train_steps)
    windows = eval_windows(model_dir)
    calibration = args.work / "calibration.txt"  # training-split text, never the held-out windows
    calibration.write_text(corpus()[0][:300_000])
    artifacts = {}  # all run by edgec's onnxruntime runner on the same token windows
    for block in (32, 128):
        for algo in ALGOS:
            out = args.work / f"edgec-{algo}-{block}"
            extra = ["--calibration", str(calibration)] if algo == "gptq" else []
            run([EDGEC, "build", "--model", str(model_dir), "--out", str(out), "--quant", "int4",
                 "--block-size", str(block), "--algo", algo, "--force", "--quiet", "--no-validate", *extra])
            artifacts[f"edgec int4 {algo} block {block}"] = out / "model.onnx"
        out = args.work / f"builder-{block}"
        run([BIN / "python", "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
             "-p", "int4", "-e", "cpu", "-c", str(args.work / "hf-cache"), "--extra_options", f"block_size={block}"])
        artifacts[f"builder int4 block {block}"] = out / "model.onnx"

    from compiler.frontend.load import build_decoder, read_checkpoint
    from compiler.validate import torch_logits

    reference = build_decoder(read_checkpoint(model_dir))
    ref_logits = [torch_logits(reference, ids) for ids in windows]
    results = {"fp32 (PyTorch)": metrics(ref_logits, ref_logits, windows)}
    for name, path in artifacts.items():
        runner = OrtRuntime(path.parent, path)
        results[name] = metrics([runner.logits(np.asarray([ids]))[0] for ids in windows], ref_logits, windows)
    (args.work / "quality.json").write_text(json.dumps(results, indent=2))
    print(f"\n{len(windows)} held-out windows of {WINDOW} tokens, {MODEL['num_hidden_layers']}-layer Llama trained "
          f"{args.train_steps} steps on stdlib sources\n")
    print_table(["artifact", "perplexity", "KL to fp32", "top-1 agreement"],
                [[name, f"{m['ppl']:.3f}", f"{m['kl']:.4f}", f"{m['top1']:.3f}"] for name, m in results.items()])
    for block in (32, 128):
        builder = results[f"builder int4 block {block}"]["kl"]
        for algo in ALGOS:
            ours = results[f"edgec int4 {algo} block {block}"]["kl"]
            print(f"KL ratio edgec {algo} / builder at block {block}: {ours / builder:.2f}x")
    ours = QuantConfig()
    defaults = results[f"edgec int4 {ours.algo} block {ours.block_size}"]["kl"] / results["builder int4 block 32"]["kl"]
    print(f"KL ratio of the defaults, edgec ({ours.algo}, block {ours.block_size}) / builder (block 32): "
          f"{defaults:.2f}x (target <= 0.70x)")


if __name__ == "__main__":
    main()
