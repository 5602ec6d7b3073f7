"""What edgec's ONNX passes share: onnx_ir in-place passes that count their rewrites, which the build
report records per pass."""

from __future__ import annotations

import onnx_ir as ir


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
