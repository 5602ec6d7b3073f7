"""CleanupPass: inlining, dead-code and common-subexpression elimination, shape-expression folding, and
constant folding when there is something to fold.

onnxscript's shape-optimization rules turn Shape -> Gather -> Concat chains into direct dimension reads,
which the attention fusions rely on. onnxscript's optimizer (constant folding, identity and cast
elimination) costs about 2 s on a 30-layer graph and, on the graphs edgec makes, finds nothing the
exporter's own run of it did not: the traced layer was optimized when exported, and the stamped copies and
the fusions add no foldable nodes. So it runs only when the graph holds a node it would fold.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import optimize
from onnxscript.rewriter.ort_fusions import shape_optimization

from compiler.onnx.passes.base import CountingPass


# onnxscript's constant folding leaves nodes with a larger constant input alone (such as the transpose of a
# tied embedding table that the lm_head reads).
FOLD_INPUT_SIZE_LIMIT = 8192


def foldable_nodes(graph: ir.Graph) -> int:
    """Nodes the optimizer would replace: Identity, or an operator all of whose inputs are small constants."""
    count = 0
    for node in graph:
        if node.op_type == "Identity" and node.domain in ("", "onnx.ai"):
            count += 1
        elif node.op_type != "Constant" and node.inputs and all(
                v is None or (v.const_value is not None and v.const_value.size <= FOLD_INPUT_SIZE_LIMIT)
                for v in node.inputs):
            count += 1
    return count


class CleanupPass(CountingPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(model.graph)
        # What a fusion left as a function call that no later fusion consumed becomes plain nodes again.
        common_passes.InlinePass()(model)
        self.counts = {"shape_expressions": shape_optimization.rules.apply_to_model(model)}
        self.counts["foldable"] = foldable_nodes(model.graph)
        if self.counts["shape_expressions"] or self.counts["foldable"]:
            common_passes.ShapeInferencePass()(model)
            optimize(model)
        common_passes.CommonSubexpressionEliminationPass()(model)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.RemoveUnusedFunctionsPass()(model)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        self.counts["nodes_removed"] = before - len(model.graph)
        return ir.passes.PassResult(model, modified=len(model.graph) != before or any(self.counts.values()))
