"""Hugging Face model directory -> checkpoint tensors (fp32, HF names) -> canonical decoder.

Only safetensors are read; pickle checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compiler.errors import UsageError
from compiler.frontend.plain_config import plain_config
from compiler.models.decoder import CanonicalDecoder, DecoderConfig
from compiler.models.families import (
    MODEL_TYPE_FAMILY,
    SUPPORTED_ARCHITECTURES,
    decoder_config,
    supported_list,
    to_canonical_state_dict,
)
from runtimes.base import sha256_file  # one hasher, shared with the on-device agent

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass
class Checkpoint:
    """What was read from a model directory, with HF-named fp32 tensors ready for the LoRA merge."""

    directory: Path
    hf_config: object
    config: DecoderConfig
    state: dict[str, torch.Tensor]
    weight_files: list[Path]
    tokenizer_files: list[Path] = field(default_factory=list)
    generation_config: Path | None = None
    pending_hashes: PendingHashes | None = None  # read_model_files(hash_sources=True)'s

    def source_hashes(self) -> dict[str, str]:
        """sha256 of the source files (config, weights, tokenizer, generation config) by file name."""
        if self.pending_hashes is not None:
            return self.pending_hashes.result()
        return hash_files(source_files(self.directory, self.weight_files, self.tokenizer_files, self.generation_config))


def source_files(directory: Path, weight_files: list[Path], tokenizer_files: list[Path],
                 generation_config: Path | None) -> list[Path]:
    files = [directory / "config.json", *weight_files, *tokenizer_files]
    return sorted(files + ([generation_config] if generation_config else []))


def hash_files(paths: list[Path]) -> dict[str, str]:
    return {p.name: remembered_sha256(p) for p in paths}


REMEMBERED_HASH_MIN_BYTES = 16 * 2**20


def hash_cache_dir() -> Path | None:
    """EDGEC_HASH_CACHE: a directory, or 0 for none; unset: ~/.cache/edgec/sha256 (under EDGEC_CACHE)."""
    from compiler.config import cache_setting

    return cache_setting("EDGEC_HASH_CACHE", "sha256")


def remembered_sha256(path: Path) -> str:
    """sha256_file, remembered by the file's identity as git's index does (path, device, inode, size,
    modification and change times; no tool sets a change time back): a rebuild from unchanged weights does
    not read them all again to hash them (a 1B model: 7 s of a core)."""
    cache = hash_cache_dir()
    if cache is None or path.stat().st_size < REMEMBERED_HASH_MIN_BYTES:
        return sha256_file(path)
    before = _identity(path)
    entry = cache / hashlib.sha256(before.encode()).hexdigest()
    try:
        digest = entry.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = sha256_file(path)
    if _identity(path) == before:  # not written while it was read
        try:
            cache.mkdir(parents=True, exist_ok=True)
            partial = entry.with_name(f"{entry.name}.{os.getpid()}.partial")
            partial.write_text(digest)
            partial.replace(entry)
        except OSError:
            pass  # a read-only cache only costs the hashing
    return digest


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"


class PendingHashes:
    """hash_files in a background thread. hashlib lets go of the GIL while it hashes, so this runs beside
    what a build does first (imports, reading the config: 1-3 s holding the GIL); the
    sha256 of a 135M model's weights takes about 0.9 s, of a 1B model's 7 s. A daemon thread: a build that
    fails before it needs the hashes does not wait for them (in a longer-lived process the thread reads on
    to the end in the background)."""

    def __init__(self, paths: list[Path]):
        self._hashes: dict[str, str] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(paths,), name="edgec-sha256", daemon=True)
        self._thread.start()

    def _run(self, paths: list[Path]) -> None:
        try:
            self._hashes = hash_files(paths)
        except BaseException as e:  # raised in the caller's thread, by result()
            self._error = e

    def result(self) -> dict[str, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hashes


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e}); restore the file from the original model") from None


def _family(raw: dict, config_path: Path) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    if not archs and raw.get("model_type") in MODEL_TYPE_FAMILY:
        return MODEL_TYPE_FAMILY[raw["model_type"]]
    found = ", ".join(archs) or f"model_type '{raw.get('model_type')}'"
    raise UsageError(f"{config_path}: architecture {found} is not supported (supported: {supported_list()})")


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UsageError(f"{index}: has no weight_map; restore the file from the original model")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in files if not p.exists()]
        if missing:
            raise UsageError(f"{index}: lists shard {missing[0]}, which is missing from {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UsageError(
            f"{directory}: only pickle checkpoints ({', '.join(pickles)}); edgec never unpickles. "
            "Convert to safetensors first (model.save_pretrained(dir, safe_serialization=True))"
        )
    raise UsageError(f"{directory}: no *.safetensors weights found")


def read_safetensors(path: Path, what: str = "weights",
                     bytes_read: Callable[[int], None] = lambda n: None) -> dict[str, torch.Tensor]:
    """All tensors of one file as fp32; a truncated or corrupt file is a UsageError naming it.

    bytes_read(n): the stored bytes of the tensors read so far, after each tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        out, read = {}, 0
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                read += t.nbytes
                out[key] = t.float() if t.is_floating_point() else t
                bytes_read(read)
        return out
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{path}: corrupt or truncated safetensors {what} ({reason}); re-download or re-save it") from None


@dataclass
class ModelFiles:
    """A model directory's configuration and weight files, read without reading any weight."""

    directory: Path
    hf_config: object
    config: DecoderConfig
    weight_files: list[Path]
    tokenizer_files: list[Path]  # listed once: the files the bundle copies are the files hashed
    generation_config: Path | None
    pending_hashes: PendingHashes | None = None


def read_model_files(directory: str | Path, hash_sources: bool = False) -> ModelFiles:
    """hash_sources: start hashing the source files now, in the background (Checkpoint.source_hashes)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: model directory does not exist")
    config_path = directory / "config.json"
    if not config_path.exists():
        empty = not any(directory.iterdir())
        reason = "is empty" if empty else "has no config.json"
        raise UsageError(f"{directory}: {reason}; pass a Hugging Face model directory (config.json + *.safetensors)")
    raw = _read_json(config_path)
    family = _family(raw, config_path)
    weight_files = _weight_files(directory)
    gen_path = directory / "generation_config.json"
    gen_path = gen_path if gen_path.exists() else None
    tokenizer_files = [directory / n for n in TOKENIZER_FILES if (directory / n).exists()]
    pending = PendingHashes(source_files(directory, weight_files, tokenizer_files, gen_path)) if hash_sources else None

    hf_config = plain_config(raw, family)
    if hf_config is None:
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(str(directory))
        except Exception as e:  # transformers raises many types for a malformed config
            raise UsageError(f"{config_path}: transformers cannot read it ({str(e).splitlines()[0]})") from None
    gen = _read_json(gen_path) if gen_path else None
    config = decoder_config(hf_config, family, str(config_path), gen)
    return ModelFiles(directory, hf_config, config, weight_files, tokenizer_files, gen_path, pending)


def read_checkpoint(directory: str | Path, progress: Callable[[int, int], None] = lambda done, total: None,
                    files: ModelFiles | None = None) -> Checkpoint:
    """progress(done, total): bytes of the weight files read, as the tensors come in. files: the directory's
    read_model_files, when already read."""
    files = files or read_model_files(directory)
    directory, weight_files = files.directory, files.weight_files
    state: dict[str, torch.Tensor] = {}
    sizes = [path.stat().st_size for path in weight_files]
    total = sum(sizes)
    for index, path in enumerate(weight_files):
        before = sum(sizes[:index])
        state.update(read_safetensors(path, bytes_read=lambda n: progress(before + n, total)))
        progress(before + sizes[index], total)  # the file's header too
    return Checkpoint(
        directory=directory,
        hf_config=files.hf_config,
        config=files.config,
        state=state,
        weight_files=weight_files,
        tokenizer_files=files.tokenizer_files,
        generation_config=files.generation_config,
        pending_hashes=files.pending_hashes,
    )


def build_decoder(checkpoint: Checkpoint, keep_state: bool = False) -> CanonicalDecoder:
    """Canonical decoder holding the checkpoint's (possibly LoRA-merged) tensors, without copying them.

    keep_state: leave the checkpoint's tensors in place too (for a reference taken between merges)."""
    cfg = checkpoint.config
    state = to_canonical_state_dict(cfg, dict(checkpoint.state) if keep_state else checkpoint.state)
    with torch.device("meta"):
        model = CanonicalDecoder(cfg)
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    where = checkpoint.directory
    if missing:
        raise UsageError(f"{where}: checkpoint lacks tensor '{missing[0]}' ({len(missing)} missing); is it a complete {cfg.family} model?")
    if unexpected:
        raise UsageError(f"{where}: checkpoint has tensor '{unexpected[0]}' that a {cfg.family} model does not use")
    for name, param in model.state_dict().items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise UsageError(
                f"{where}: tensor '{name}' has shape {tuple(state[name].shape)}, config.json implies {tuple(param.shape)}"
            )
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_inv_freq = torch.tensor(cfg.rope_inv_freq, dtype=torch.float32)
    model.local_rope_inv_freq = torch.tensor(cfg.local_rope_inv_freq, dtype=torch.float32)
    if not keep_state:
        checkpoint.state = {}  # the model owns the tensors now
    return model.eval()
