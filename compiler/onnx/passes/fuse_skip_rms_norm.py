"""FuseSkipRmsNormPass: residual Add followed by SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization.

The fused op also returns the sum, which the next residual connection uses (onnxscript's rules).
"""

from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset

from compiler.onnx.passes.base import RuleSetPass


class FuseSkipRmsNormPass(RuleSetPass):
    def rule_sets(self):
        return {"skip_rms_normalization": skip_rms_normalization_ruleset}
