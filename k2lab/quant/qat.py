"""Weight-only INT4 QAT for the routed experts.

QAT swaps each `Experts` for `QATExperts`, whose `weights()` fake-quantizes with a straight-through estimator:
the forward sees exactly the INT4 weights the export will write, the optimizer updates full-precision latent
weights. Everything else trains in full precision. The export quantizes the latent weights with the same
rule, so the INT4 checkpoint computes what QAT trained.

Training with QAT is a mode of the one training loop (k2lab.train.loop, `qat=True`): `k2lab pretrain --qat`
and `k2lab qat` (k2lab.train.qat) both run it; PTQ (`k2lab quantize`) is k2lab.train.qat.quantize.
"""

from __future__ import annotations


import torch

from k2lab.model import Experts, K2ForCausalLM, MoE
from k2lab.quant import int4


class QATExperts(Experts):
    """Routed experts whose forward uses fake-quantized INT4 weights (gradients straight through)."""

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(int4.fake_quantize(w) for w in (self.gate_proj, self.up_proj, self.down_proj))


def enable_qat_(model: K2ForCausalLM) -> K2ForCausalLM:
    """Switch every routed `Experts` to `QATExperts` in place, keeping the same parameter objects."""
    for moe in model.modules():
        if isinstance(moe, MoE) and type(moe.experts) is Experts:
            old = moe.experts
            with torch.device("meta"):
                new = QATExperts(old.n_experts, old.gate_proj.shape[2], old.gate_proj.shape[1])
            new.gate_proj, new.up_proj, new.down_proj = old.gate_proj, old.up_proj, old.down_proj
            moe.experts = new
    return model
