"""FuseRotaryEmbeddingPass: rotate-half rope -> com.microsoft RotaryEmbedding with cos/sin caches.

onnxscript's rules find x*cos + rotate_half(x)*sin (and the partial-rotary form), then replace the
per-call cos/sin computation from position_ids by a lookup in constant [max_positions, rotary_dim/2]
tables, as the ONNX Runtime GenAI builder's models have them.
"""

from __future__ import annotations

import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.cos_sin_cache import CosSinCacheFusion
from onnxscript.rewriter.ort_fusions.rotary_embedding import partial_embedding_rules, rotary_embedding_rules

from compiler.onnx.passes.base import RuleSetPass


class _BoundedCosSinCache(CosSinCacheFusion):
    """onnxscript's cos/sin cache rule with the table size fixed to the model's context length."""

    def __init__(self, max_positions: int, name: str, **kwargs):
        super().__init__(name, **kwargs)
        self.max_pos_id = max_positions - 1


class FuseRotaryEmbeddingPass(RuleSetPass):
    def __init__(self, max_positions: int):
        super().__init__()
        self.max_positions = max_positions

    def rule_sets(self):
        cos_sin = pattern.RewriteRuleSet([
            _BoundedCosSinCache.rule(self.max_positions, "CosSinCache_cast", cast=True),
            _BoundedCosSinCache.rule(self.max_positions, "CosSinCache", cast=False),
        ])
        return {"rotary_embedding": rotary_embedding_rules, "cos_sin_cache": cos_sin}

    def call(self, model):
        result = super().call(model)
        # Rope on q and k computes the same cos/sin twice; merge before the partial-rotary rule.
        common_passes.CommonSubexpressionEliminationPass()(model)
        self.counts["partial_rotary_embedding"] = partial_embedding_rules.apply_to_model(model)
        result.modified = result.modified or bool(self.counts["partial_rotary_embedding"])
        return result
