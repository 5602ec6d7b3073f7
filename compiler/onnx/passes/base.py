"""What edgec's ONNX passes share: onnx_ir in-place passes that count their rewrites per rule."""

from __future__ import annotations

import onnx_ir as ir


class RuleSetPass(ir.passes.InPlacePass):
    """Applies named onnxscript rewrite rule sets in order; `counts` holds the rewrites per rule set."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def rule_sets(self) -> dict:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = {}
        for name, rules in self.rule_sets().items():
            self.counts[name] = rules.apply_to_model(model)
        return ir.passes.PassResult(model, modified=any(self.counts.values()))
