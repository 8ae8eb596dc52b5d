"""Muon equals torch.optim.Muon(match_rms_adamw) on 2-D weights and per-expert 2-D Muon on 3-D expert stacks."""

import math

import pytest
import torch
from torch import nn

from k2lab.optim.muon import Muon, build_optimizer, zeropower_via_newtonschulz


def _run(opt_factory, shapes, steps=4, seed=0):
    """Train params of `shapes` for a few steps on fixed random gradients; return the final params."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(*s, generator=g) * 0.1) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(steps)]
    opt = opt_factory(params)
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (64, 64)])
def test_equals_torch_muon_at_matching_precision(shape):
    # Both run Newton-Schulz in bf16 here: the same arithmetic, so the results agree to float rounding.
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    ref = _run(lambda ps: torch.optim.Muon(ps, adjust_lr_fn="match_rms_adamw", **kw), [shape])
    ours = _run(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **kw), [shape])
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-6)


def test_fp32_newton_schulz_is_torch_muon_up_to_bf16_rounding():
    kw = dict(lr=0.02, weight_decay=0.1)
    ref = _run(lambda ps: torch.optim.Muon(ps, adjust_lr_fn="match_rms_adamw", **kw), [(48, 32)])
    ours = _run(lambda ps: Muon(ps, **kw), [(48, 32)])  # CPU default: fp32 Newton-Schulz
    before = _run(lambda ps: Muon(ps, lr=0.0), [(48, 32)])
    moved = (ref[0] - before[0]).abs().max()
    assert (ours[0] - ref[0]).abs().max() < 0.02 * moved  # bf16 keeps ~3 significant digits


def test_3d_expert_stack_equals_per_expert_2d_muon():
    E, A, B = 4, 24, 40
    kw = dict(lr=0.02, weight_decay=0.1)
    stacked = _run(lambda ps: Muon(ps, **kw), [(E, A, B)])[0]
    # The same numbers as E separate [A, B] parameters: same generator draws, split along the expert axis.
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(E, A, B, generator=g) * 0.1
    grads = [torch.randn(E, A, B, generator=g) for _ in range(4)]
    experts = [nn.Parameter(w0[e].clone()) for e in range(E)]
    opt = Muon(experts, **kw)
    for gr in grads:
        for e, p in enumerate(experts):
            p.grad = gr[e].clone()
        opt.step()
    torch.testing.assert_close(stacked, torch.stack([p.detach() for p in experts]), rtol=1e-5, atol=1e-6)
    # ... and each expert slice matches torch.optim.Muon at matching (bf16) precision.
    stacked_bf16 = _run(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **kw), [(E, A, B)])[0]
    ref = [nn.Parameter(w0[e].clone()) for e in range(E)]
    opt = torch.optim.Muon(ref, adjust_lr_fn="match_rms_adamw", **kw)
    for gr in grads:
        for e, p in enumerate(ref):
            p.grad = gr[e].clone()
        opt.step()
    torch.testing.assert_close(stacked_bf16, torch.stack([p.detach() for p in ref]), rtol=0, atol=1e-5)


def test_newton_schulz_orthogonalizes_and_update_rms_matches_adamw():
    G = torch.randn(3, 64, 128)
    O = zeropower_via_newtonschulz(G)
    s = torch.linalg.svdvals(O)
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic lands singular values in roughly (0.7, 1.2)
    # 0.2*sqrt(max(A,B)) scaling gives an update RMS near 0.2, AdamW's typical update RMS.
    rms = (O[0] * 0.2 * math.sqrt(128)).pow(2).mean().sqrt()
    assert 0.15 < rms < 0.25


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="2-D weights or 3-D"):
        Muon([nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(nn.Linear(2, 2), kind="sgd")


class _Toy(nn.Module):
    """Module names shaped like the K2 checkpoint, to check the parameter grouping."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8, bias=False)
        self.experts = nn.Parameter(torch.zeros(2, 4, 8))
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(8, 2, bias=False)
        self.lm_head = nn.Linear(8, 10, bias=False)


def test_build_optimizer_groups():
    m = _Toy()
    opt = build_optimizer(m, kind="muonclip", lr=1e-3, weight_decay=0.1)
    muon, adamw = opt.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {id(p) for p in muon.param_groups[0]["params"]} == {id(m.proj.weight), id(m.experts)}
    decay, no_decay = adamw.param_groups
    assert {id(p) for p in decay["params"]} == {id(m.embed_tokens.weight), id(m.mlp.gate.weight),
                                                 id(m.lm_head.weight)}
    assert no_decay["weight_decay"] == 0.0 and adamw.defaults["betas"] == (0.9, 0.95)
    assert all(g["base_lr"] == 1e-3 for g in opt.param_groups)
    only_adamw = build_optimizer(m, kind="adamw")
    assert [type(o) for o in only_adamw.optimizers] == [torch.optim.AdamW]
