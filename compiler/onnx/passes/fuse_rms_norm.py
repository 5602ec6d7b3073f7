"""FuseRmsNormPass: x * rsqrt(mean(x^2) + eps) * w  ->  com.microsoft SimplifiedLayerNormalization.

The pattern and rewrite are onnxscript's ort_fusions rules (they cover the Pow/ReduceMean/Add/Sqrt/
Reciprocal form that torch.export writes for RMSNorm).
"""

from onnxscript.rewriter.ort_fusions.rms_normalization import rms_normalization_ruleset

from compiler.onnx.passes.base import RuleSetPass


class FuseRmsNormPass(RuleSetPass):
    def rule_sets(self):
        return {"rms_normalization": rms_normalization_ruleset}
