"""The one-layer trace, kept on disk without its weights: a later build of the same architecture binds its own.

The trace that layer_template.py stamps costs 7-11 s of a 135M build (torch.export and its decompositions
on fake tensors), the same for every build of one architecture: CI exporting each new fine-tune of a base
model traces the same graph again. The graph depends on the decoder's structure and configuration, the
options the export takes, and the code and libraries that trace it; the weights only fill its initializers.
So edgec stores the traced graph with every initializer that holds a parameter (as it is or transposed)
reduced to a reference to that parameter, and a build whose key matches loads it and binds its own
parameters instead of tracing.

Only graphs whose every other initializer is plainly independent of the weights are stored: integer
constants (shapes, indices), float scalars, and the rope frequencies of the configuration. A folded
constant made from a weight (say a norm's 1 + w) would not be recognised, so a graph holding one is not
stored and is traced every time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from compiler.models.decoder import CanonicalDecoder
from compiler.onnx.layer_template import parameter_tensor

SOURCES_KEY = "edgec.trace_cache.sources"  # model metadata: initializer name -> [parameter, transposed]
NAMES_KEY = "edgec.trace_cache.names"  # model metadata: the graph's name authority (see _names)
PLACEHOLDER = "edgec-parameter"  # the external-data location that stands for "bound at load"
MAX_INT_CONSTANT = 4096  # elements: shape and index constants are small
MAX_ENTRIES = 64  # the least recently used go first: each edgec source change makes new keys

_source_digest: str | None = None


def default_dir() -> Path | None:
    """EDGEC_TRACE_CACHE: a directory, or 0 for none; unset: ~/.cache/edgec/onnx-traces (under EDGEC_CACHE)."""
    from compiler.config import cache_setting

    return cache_setting("EDGEC_TRACE_CACHE", "onnx-traces")


def _edgec_sources() -> str:
    """sha256 over edgec's own Python sources: any change to the code that builds or traces the decoder
    (or anything else in the compiler) makes a new key."""
    global _source_digest
    if _source_digest is None:
        root = Path(__file__).resolve().parents[1]
        digest = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        _source_digest = digest.hexdigest()
    return _source_digest


def trace_key(view: CanonicalDecoder, options: dict) -> str:
    from compiler.bundle import library_versions

    inputs = {
        "config": dataclasses.asdict(view.cfg),
        "decoder": type(view).__qualname__,
        "parameters": [[name, list(t.shape), str(t.dtype)] for name, t in view.state_dict().items()],
        "options": options,
        "libraries": library_versions(),
        "edgec": _edgec_sources(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def store(directory: Path, key: str, model: ir.Model, view: CanonicalDecoder) -> bool:
    """Write the traced one-layer graph under `key`, its parameters as references; False when it is not
    stored (an initializer of unknown origin). The model itself is left as it was."""
    params = dict(view.state_dict())
    sources = None if any(t.numel() <= 1 for t in params.values()) else _parameter_sources(model, view, params)
    if sources is None:
        logging.getLogger("edgec").info("trace not cached: an initializer is neither a parameter nor a constant")
        return False
    names = _names(model.graph)
    if names is None:
        return False
    swapped = {}
    try:
        for name in sources:
            value = model.graph.initializers[name]
            swapped[name] = value.const_value
            value.const_value = ir.ExternalTensor(PLACEHOLDER, 0, 0, value.const_value.dtype,
                                                  shape=value.const_value.shape, name=name)
        proto = ir.serde.serialize_model(model)
    finally:
        for name, tensor in swapped.items():
            model.graph.initializers[name].const_value = tensor
    proto.metadata_props.add(key=SOURCES_KEY, value=json.dumps(sources, sort_keys=True))
    proto.metadata_props.add(key=NAMES_KEY, value=json.dumps(names, sort_keys=True))
    staging = directory / f".{key}.{os.getpid()}.onnx"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, staging)
        os.replace(staging, directory / f"{key}.onnx")  # whole or absent, also with two builds at once
    except OSError as e:
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)
        logging.getLogger("edgec").info("trace not cached: %s", e)
        return False
    _prune(directory)
    return True


def _prune(directory: Path) -> None:
    try:  # another build may be pruning or storing at the same time
        entries = sorted(((p.stat().st_mtime, p) for p in directory.glob("*.onnx")), reverse=True)
        for _, stale in entries[MAX_ENTRIES:]:
            stale.unlink(missing_ok=True)
    except OSError:
        pass


def load(directory: Path, key: str, view: CanonicalDecoder) -> ir.Model | None:
    """The graph stored under `key` with `view`'s parameters bound in, or None (absent or unreadable)."""
    path = directory / f"{key}.onnx"
    if not path.is_file():
        return None
    try:
        proto = onnx.load(str(path), load_external_data=False)
        entries = {p.key: p for p in proto.metadata_props if p.key in (SOURCES_KEY, NAMES_KEY)}
        sources, names = json.loads(entries[SOURCES_KEY].value), json.loads(entries[NAMES_KEY].value)
        for entry in entries.values():
            proto.metadata_props.remove(entry)
        model = ir.serde.deserialize_model(proto)
        _restore_names(model.graph, names)
    except Exception as e:  # a damaged entry is traced again and then replaced
        logging.getLogger("edgec").warning("ignoring the cached trace %s: %s", path, e)
        return None
    params = dict(view.state_dict())
    for name, (param, transposed) in sources.items():
        value, tensor = model.graph.initializers.get(name), params.get(param)
        if value is None or tensor is None or tuple(value.shape) != tuple(_stored_shape(tensor, transposed)):
            return None
        value.const_value = parameter_tensor(tensor, name, transposed)
    if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept by _prune
    return model


def _names(graph: ir.Graph) -> dict | None:
    """The graph's name authority: the passes name the nodes and values they add from its counters
    (node_{op}_{n}, val_{n}) and skip every name it has seen, so a loaded graph must continue from the
    traced graph's state for its nodes to get the names they get after a trace. None if this onnx_ir
    keeps it otherwise (then nothing is stored)."""
    authority = getattr(graph, "_name_authority", None)
    try:
        return {"value_counter": authority._value_counter, "node_counter": authority._node_counter,
                "value_names": sorted(authority._value_names), "node_names": sorted(authority._node_names)}
    except AttributeError:
        return None


def _restore_names(graph: ir.Graph, names: dict) -> None:
    authority = graph._name_authority
    authority._value_counter, authority._node_counter = names["value_counter"], names["node_counter"]
    authority._value_names |= set(names["value_names"])
    authority._node_names |= set(names["node_names"])


def _stored_shape(tensor: torch.Tensor, transposed: bool) -> tuple:
    return tuple(tensor.shape[::-1]) if transposed else tuple(tensor.shape)


def _parameter_sources(model: ir.Model, view: CanonicalDecoder,
                       params: dict[str, torch.Tensor]) -> dict[str, tuple[str, bool]] | None:
    """Initializer name -> (parameter, stored transposed) for those holding a parameter's data exactly;
    None if another initializer might depend on the weights."""
    by_shape: dict[tuple, list[tuple[str, bool]]] = {}
    for name, tensor in params.items():
        by_shape.setdefault(tuple(tensor.shape), []).append((name, False))
        if tensor.dim() == 2:
            by_shape.setdefault(tuple(tensor.shape[::-1]), []).append((name, True))
    rope = [np.asarray(f, dtype=np.float32) for f in (view.cfg.rope_inv_freq, view.cfg.local_rope_inv_freq) if f]
    sources = {}
    for name, value in model.graph.initializers.items():
        array = value.const_value.numpy()
        matches = [c for c in by_shape.get(array.shape, []) if array.dtype == np.float32
                   and np.array_equal(_as_stored(params[c[0]], c[1]), array)]
        # Tied parameters (embedding and lm_head) are one tensor under two names: one match, not two.
        distinct: dict[tuple[int, bool], tuple[str, bool]] = {}
        for param, transposed in matches:
            distinct.setdefault((params[param].data_ptr(), transposed), (param, transposed))
        matches = list(distinct.values())
        if len(matches) > 1:
            # Two parameters hold this data (an untrained model's norms, all ones): the exporter may have
            # merged their initializers into this one, which the next model's two tensors would then share.
            return None
        named = [c for c in matches if c[0] == name and not c[1]]
        if named:
            sources[name] = named[0]
        elif matches:
            # An unnamed constant equal to one parameter is taken to be it, but not when the parameter is
            # all one value (a constant of zeros or ones may be equal to it by chance, and would then follow
            # the next model's weights).
            (param, transposed), = matches
            if np.all(array == array.flat[0]):
                return None
            sources[name] = (param, transposed)
        elif np.issubdtype(array.dtype, np.integer) and array.size <= MAX_INT_CONSTANT:
            continue
        elif array.dtype == np.float32 and (array.size <= 1 or any(
                r.size == array.size and np.array_equal(r, array.reshape(-1)) for r in rope)):
            continue
        else:
            return None
    return sources


def _as_stored(tensor: torch.Tensor, transposed: bool) -> np.ndarray:
    array = tensor.detach().numpy()
    return array.T if transposed else array
