"""model_prompt.onnx: the decoder graph again, its quantized MatMuls at another accuracy level, run on prompts.

onnxruntime fixes a MatMulNBits node's kernel by its accuracy_level when the session is made, and the kernel
fastest for one token at a time (int8 activations, level 4) need not be the fastest for a prompt's many rows
(fp32, level 1, on x86 for small models: docs/build.md). onnxruntime-genai runs a pipeline of graphs, one on
prompts and one on generated tokens (decoder.pipeline in genai_config.json), so a bundle can carry both.
The second graph reads the first one's weights file; each session packs its own copy of the weights.
"""

from __future__ import annotations

from pathlib import Path

import onnx

PROMPT_FILE = "model_prompt.onnx"


def write_prompt_graph(model_path: Path, prompt_path: Path, accuracy_level: int) -> dict:
    """Write the graph at model_path (weights left in its external data file) with every MatMulNBits at
    accuracy_level. Returns {"quantized_matmuls": count changed, "inputs": [...], "outputs": [...]}."""
    model = onnx.load(str(model_path), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        level = next((a for a in node.attribute if a.name == "accuracy_level"), None)
        if level is None:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy_level))
        else:
            level.i = accuracy_level
        changed += 1
    if changed:
        onnx.save(model, str(prompt_path))
    return {"quantized_matmuls": changed, "inputs": [i.name for i in model.graph.input],
            "outputs": [o.name for o in model.graph.output]}
