"""Schedules as pure functions; aux-loss-free bias update, sequence-wise aux loss, imbalance metric."""

import pytest
import torch
from torch import nn

from k2lab.optim.balance import imbalance, sequence_aux_loss, update_bias_
from k2lab.optim.schedules import lr_factor


def test_wsd_shape():
    f = [lr_factor(s, schedule="wsd", max_steps=100, warmup_steps=10, decay_frac=0.2, min_ratio=0.1)
         for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0
    assert all(x == 1.0 for x in f[10:80])
    assert all(a >= b for a, b in zip(f[80:], f[81:])) and f[-1] == pytest.approx(0.1)


def test_cosine_shape():
    f = [lr_factor(s, schedule="cosine", max_steps=50, warmup_steps=5) for s in range(50)]
    assert f[4] == 1.0 and f[5] == 1.0 and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[5:], f[6:]))


def test_bad_schedule_settings():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, schedule="linear", max_steps=10, warmup_steps=1)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_factor(0, schedule="wsd", max_steps=10, warmup_steps=10)


class _MoE(nn.Module):
    """A stand-in carrying only what the balancer reads (router bias buffer and last_load)."""

    def __init__(self, load):
        super().__init__()
        self.gate = nn.Module()
        self.gate.register_buffer("e_score_correction_bias", torch.zeros(len(load)))
        self.last_load = torch.tensor(load)


def test_bias_moves_towards_balance():
    model = nn.ModuleList([_MoE([10, 2, 4, 0]), _MoE([4, 4, 4, 4])])
    imb = update_bias_(model, gamma=0.01)
    assert imb == [pytest.approx(10 / 4), 1.0]
    torch.testing.assert_close(model[0].gate.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    assert torch.equal(model[1].gate.e_score_correction_bias, torch.zeros(4))


def test_sequence_aux_loss_is_minimal_when_balanced():
    E, k, T = 4, 2, 8
    scores = torch.full((1, T, E), 0.5)
    balanced = torch.tensor([[0, 1], [2, 3]] * (T // 2))[None]
    skewed = torch.tensor([[0, 1]] * T)[None]
    assert sequence_aux_loss(scores, balanced, alpha=1.0) == pytest.approx(1.0)  # sum f_e P_e = 1 when uniform
    skewed_scores = scores.clone()
    skewed_scores[..., :2] = 0.9
    assert sequence_aux_loss(skewed_scores, skewed, 1.0) > sequence_aux_loss(skewed_scores, balanced, 1.0)
    assert imbalance(torch.tensor([8, 0, 0, 0])) == 4.0


def test_sequence_aux_loss_on_the_real_router_reaches_the_gate_weights():
    from k2lab.model import K2ForCausalLM
    from k2lab.train.loop import RouterScores
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = K2ForCausalLM(tiny_config()).train()
    hooks = RouterScores(model)
    ids = torch.randint(0, 500, (2, 16))
    model(ids)
    aux = hooks.loss(bsz=2, alpha=0.01)
    assert aux > 0 and len(hooks.moes) == 2
    aux.backward()
    assert all(m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0 for m in hooks.moes)
    # Each MoE layer recorded every token's k choices (what the bias update reads).
    for m in hooks.moes:
        load = m.last_load.float()
        assert load.sum() == 2 * 16 * model.config.num_experts_per_tok
