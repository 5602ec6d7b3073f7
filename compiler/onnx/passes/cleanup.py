"""CleanupPass: constant folding, dead-code, identity and cast elimination, shape-expression folding.

onnxscript's optimizer does the folding and elimination; its shape-optimization rules turn
Shape -> Gather -> Concat chains into direct dimension reads, which the attention fusions rely on.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import optimize
from onnxscript.rewriter.ort_fusions import shape_optimization

from compiler.onnx.passes.base import CountingPass


class CleanupPass(CountingPass):
    """fold_constants=False skips onnxscript's optimizer (seconds on a 30-layer graph): right after
    export, which already folded the traced graph, only the stamped layers' repeats need merging."""

    def __init__(self, fold_constants: bool = True):
        super().__init__()
        self.fold_constants = fold_constants

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(model.graph)
        common_passes.ShapeInferencePass()(model)
        if self.fold_constants:
            optimize(model)
        self.counts = {"shape_expressions": shape_optimization.rules.apply_to_model(model)}
        if self.counts["shape_expressions"]:  # folding (again) only pays when shapes were rewritten
            optimize(model)
        common_passes.CommonSubexpressionEliminationPass()(model)
        common_passes.RemoveUnusedNodesPass()(model)
        self.counts["nodes_removed"] = before - len(model.graph)
        return ir.passes.PassResult(model, modified=len(model.graph) != before or any(self.counts.values()))
