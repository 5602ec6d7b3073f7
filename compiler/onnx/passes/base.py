"""What edgec's ONNX passes share: onnx_ir in-place passes that count their rewrites, which the build
report records per pass."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.memory import release_pages


class CountingPass(ir.passes.InPlacePass):
    """An onnx_ir in-place pass whose `counts` (what it rewrote, by name) are set by each call."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}


class RuleSetPass(CountingPass):
    """Applies named onnxscript rewrite rule sets in order; `counts` holds the rewrites per rule set."""

    def rule_sets(self) -> dict:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = {}
        for name, rules in self.rule_sets().items():
            self.counts[name] = rules.apply_to_model(model)
        return ir.passes.PassResult(model, modified=any(self.counts.values()))


class TransposedRows(ir.LazyTensor):
    """rows.T ([K, N], a MatMul's weight) of `rows` ([N, K], a Linear's), transposed only if something reads
    it (the writer, a weight kept in fp32): the model never holds a transposed copy of every weight at once,
    and passes that want the Linear's layout (quantization, q/k/v packing) read `rows` itself, not copied
    (a transposed copy of every 1B weight cost 8 s)."""

    def __init__(self, rows: np.ndarray, name: str | None = None):
        super().__init__(lambda: _transposed(rows), ir.DataType.FLOAT, ir.Shape(rows.shape[::-1]), name=name)
        self.rows = rows


def _transposed(rows: np.ndarray) -> ir.TensorProtocol:
    copy = ir.tensor(np.ascontiguousarray(rows.T))
    release_pages(rows)  # read into the copy: the source's mapped pages go back (see release_pages)
    return copy


def weight_rows(value: ir.Value | None) -> np.ndarray | None:
    """A MatMul's constant 2-D weight [K, N] as rows [N, K] (a view, not a copy); None if not one."""
    if value is None or value.const_value is None:
        return None
    if isinstance(value.const_value, TransposedRows):
        return value.const_value.rows
    array = value.const_value.numpy()
    return array.T if array.ndim == 2 else None
