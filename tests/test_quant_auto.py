"""Per-module quantization sensitivity (compiler/quant/sensitivity.py) on the small fitted model."""

import torch

from compiler.frontend.load import build_decoder, read_checkpoint
from compiler.quant.gptq import calibration_sequences
from compiler.quant.sensitivity import Probe, sensitivities


def test_sensitivity_ranks_a_damaged_module_first(trained_dir):
    decoder = build_decoder(read_checkpoint(trained_dir))
    damaged = decoder.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():  # one outlier per block row stretches its int4 scale: the rest rounds to zero
        damaged[:, ::32] *= 40
    probe = Probe(decoder, calibration_sequences(trained_dir, None, decoder.cfg.vocab_size, count=2))
    kl = sensitivities(decoder, probe, {})
    ranked = sorted(kl, key=lambda p: -kl[p][(4, 128)])
    assert ranked[0] == "model.layers.1.mlp.up_proj", {p: kl[p][(4, 128)] for p in ranked[:3]}
