"""CleanupPass: inlining, dead-code and common-subexpression elimination, shape-expression folding, onnxscript's
default rewrite rules, and constant folding when there is something to fold.

onnxscript's shape-optimization rules turn Shape -> Gather -> Concat chains into direct dimension reads,
which the attention fusions rely on. onnxscript's full optimizer (shape inference, constant folding, then
its rewrite rules, twice) cost about 3 s on the stamped 30-layer 135M graph and found nothing more than
this pass does: the traced layer was optimized when exported, and neither the stamped copies nor the
fusions add a foldable node. So the folding runs only when the graph holds a node it would fold.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter
from onnxscript.optimizer import optimize
from onnxscript.optimizer._constant_folding import DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT
from onnxscript.rewriter.ort_fusions import shape_optimization

from compiler.onnx.passes.base import CountingPass


def foldable_nodes(graph: ir.Graph) -> int:
    """Nodes the optimizer would fold: an Identity, or an operator whose inputs are all small constants.
    Not counted: onnxscript also folds a node whose large constant input it alone reads (a Transpose of a
    weight); the exporter has folded those, and the tied embedding table the lm_head transposes is read by
    the Gather too. Constant nodes must be lifted to initializers first: their outputs carry no const_value."""
    count = 0
    for node in graph:
        if node.domain != "":
            continue
        if node.op_type == "Identity" or node.inputs and all(
                v is None or (v.const_value is not None and v.const_value.size <= DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT)
                for v in node.inputs):
            count += 1
    return count


class CleanupPass(CountingPass):
    """rewrite_rules: apply onnxscript's default rewrite rules (no-op nodes, adjacent Transpose, Reshape or
    Cast pairs; 0.1-0.2 s on the 135M graph after the fusions), needed after the fusions: MultiHeadAttention
    comes wrapped in reshapes and transposes that cancel the exporter's. Right after export the traced graph
    has had them. counts["foldable"]: the nodes that made the optimizer run (0 when it did not)."""

    def __init__(self, rewrite_rules: bool = True):
        super().__init__()
        self.rewrite_rules = rewrite_rules

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(model.graph)
        # What a fusion left as a function call that no later fusion consumed becomes plain nodes again.
        common_passes.InlinePass()(model)
        _tidy(model)
        self.counts = {"shape_expressions": shape_optimization.rules.apply_to_model(model)}
        self.counts["foldable"] = foldable_nodes(model.graph)
        if self.counts["shape_expressions"] or self.counts["foldable"]:
            common_passes.ShapeInferencePass()(model)
            optimize(model)  # ends with its own rewrite rules, lifting, deduplication and eliminations
        elif self.rewrite_rules:
            rewriter.rewrite(model)
            _tidy(model)
        self.counts["nodes_removed"] = before - len(model.graph)
        return ir.passes.PassResult(model, modified=len(model.graph) != before or any(self.counts.values()))


def _tidy(model: ir.Model) -> None:
    """Identities, repeated subexpressions and dead nodes out; Constant nodes become initializers, one per
    distinct small value (before the subexpressions that read them are compared)."""
    for cleanup in (common_passes.IdentityEliminationPass(),
                    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                    common_passes.DeduplicateInitializersPass(), common_passes.CommonSubexpressionEliminationPass(),
                    common_passes.RemoveUnusedNodesPass(), common_passes.RemoveUnusedFunctionsPass(),
                    common_passes.RemoveUnusedOpsetsPass()):
        cleanup(model)
