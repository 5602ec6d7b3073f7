"""FuseGroupQueryAttentionPass: matmul-softmax-matmul attention with the KV concat -> GroupQueryAttention.

Two onnxscript rule sets in order: scaled-dot-product attention (Q K^T * scale + mask, softmax, @ V)
to an SDPA marker, then SDPA with the past/present Concat, the GQA head expansion, the causal +
padding mask and RotaryEmbedding on q and k to com.microsoft GroupQueryAttention (do_rotary=1). The
fused op reads sequence lengths from position_ids, so the KV cache can be one buffer of the context
length shared by past and present (onnxruntime-genai's past_present_share_buffer): decode then writes
one position per token instead of copying the whole cache.

onnxscript's GQA rule drops the SDPA's scale, so the pass sets it again (Gemma 3's query_pre_attn_scalar is
not head_dim). An SDPA that the GQA rule does not take (attention without a RotaryEmbedding; the export gives SmolLM3's
layers without rope one of angle 0) becomes com.microsoft MultiHeadAttention over the expanded heads, its KV
concat kept.
"""

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter.ort_fusions.gqa import gqa_rules
from onnxscript.rewriter.ort_fusions.sdpa import sdpa_rules
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha

from compiler.onnx.passes.base import RuleSetPass


def _sdpa_scales(model: ir.Model) -> set:
    return {n.attributes.get_float("scale", None) for n in model.graph
            if n.op_type == "SDPA" and n.domain == "ai.onnxruntime._fusion"}


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
        scales = _sdpa_scales(model)
        if len(scales) > 1:  # which GQA came from which SDPA is not kept: fuse none rather than guess
            self.counts["skipped_mixed_scales"] = 1
            self.counts["group_query_attention"] = 0
        else:
            self.counts["group_query_attention"] = gqa_rules.apply_to_model(model)
            scale = scales.pop() if scales else None
            if scale is not None:
                for node in model.graph:
                    if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
                        node.attributes["scale"] = ir.AttrFloat32("scale", scale)
        self.counts["multi_head_attention"] = replace_sdpa_by_mha(model)
        result.modified = result.modified or bool(self.counts["group_query_attention"] + self.counts["multi_head_attention"])
        return result
