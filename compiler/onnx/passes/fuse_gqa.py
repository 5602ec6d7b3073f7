"""FuseGroupQueryAttentionPass: matmul-softmax-matmul attention with the KV concat -> GroupQueryAttention.

Two onnxscript rule sets in order: scaled-dot-product attention (Q K^T * scale + mask, softmax, @ V)
to an SDPA marker, then SDPA with the past/present Concat, the GQA head expansion, the causal +
padding mask and RotaryEmbedding on q and k to com.microsoft GroupQueryAttention (do_rotary=1). The
fused op reads sequence lengths from position_ids, so the KV cache can be one buffer of the context
length shared by past and present (onnxruntime-genai's past_present_share_buffer): decode then writes
one position per token instead of copying the whole cache.
"""

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter.ort_fusions.gqa import gqa_rules
from onnxscript.rewriter.ort_fusions.sdpa import sdpa_rules

from compiler.onnx.passes.base import RuleSetPass


class FuseGroupQueryAttentionPass(RuleSetPass):
    def __init__(self, rotary_dim: int):
        super().__init__()
        self.rotary_dim = rotary_dim

    def rule_sets(self):
        return {"sdpa": sdpa_rules}

    def call(self, model):
        if (self.rotary_dim // 2) % 8:
            # onnxruntime's GroupQueryAttention needs cos/sin tables a multiple of 8 wide.
            self.counts = {"skipped_rotary_dim_not_multiple_of_16": 1}
            return ir.passes.PassResult(model, modified=False)
        result = super().call(model)
        common_passes.ShapeInferencePass()(model)
        self.counts["group_query_attention"] = gqa_rules.apply_to_model(model)
        result.modified = result.modified or bool(self.counts["group_query_attention"])
        return result
