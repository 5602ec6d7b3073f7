"""The torch module path that the dynamo exporter records on each ONNX node.

`pkg.torch.onnx.name_scopes` holds the scope list (['', 'model.layers.0', ..., 'model.layers.0.mlp.up_proj',
'linear_5']); the layer template, QKV packing and quantization overrides all read or rename it here.
"""

from __future__ import annotations

import ast

import onnx_ir as ir

NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def scopes(node: ir.Node) -> list[str]:
    raw = node.metadata_props.get(NAME_SCOPES)
    try:
        return list(ast.literal_eval(raw)) if raw else []
    except (ValueError, SyntaxError):
        return []


def module_path(node: ir.Node) -> str:
    """The innermost module's path ('model.layers.0.mlp.up_proj'), '' when the exporter recorded none."""
    names = scopes(node)
    return names[-2] if len(names) >= 2 else ""


def renamed_scopes(node: ir.Node, old: str, new: str) -> dict[str, str]:
    """The node's metadata with `old` replaced by `new` in its scope paths (first occurrence in each)."""
    metadata = dict(node.metadata_props)
    if NAME_SCOPES in metadata:
        metadata[NAME_SCOPES] = repr([s.replace(old, new, 1) for s in scopes(node)])
    return metadata
