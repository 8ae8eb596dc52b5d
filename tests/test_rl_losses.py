"""RL losses against hand-computed values, and the K1.5 gradient identity checked with autograd."""

import math

import pytest
import torch

from k2lab.train.rl.losses import (LOSSES, all_equal_share, entropy, grpo_loss, k15_loss, k25_loss, log_ratio_stats,
                                   token_logprobs)
from k2lab.train.rl.trajectory import Trajectory, collate
from tests.conftest import random_model, tiny_config
from tests.test_rl_trajectory import sample_turn

# one group of K=2: sample 0 has log-ratios [0.5, 0], sample 1 has [0, -2] with its second token masked
LOGP = torch.tensor([[-1.0, -2.0], [-1.0, -3.0]])
OLD = torch.tensor([[-1.5, -2.0], [-1.0, -1.0]])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
R = torch.tensor([1.0, 0.0])


def test_k15_by_hand():
    # advantages +-0.5; sequence log-ratios 0.5 and 0; residuals 0.5 - 0.1*0.5 = 0.45 and -0.5
    assert float(k15_loss(LOGP, OLD, MASK, R, k=2, tau=0.1)) == pytest.approx((0.45**2 + 0.5**2) / 2)


def test_k15_averages_over_prompts():
    two = k15_loss(LOGP.repeat(2, 1), OLD.repeat(2, 1), MASK.repeat(2, 1), torch.tensor([1.0, 0.0, 3.0, 3.0]), k=2)
    assert float(two) == pytest.approx(((0.45**2 + 0.5**2) / 2 + (0.1 * 0.5) ** 2 / 2) / 2)


def test_k25_by_hand_and_masking():
    # kept tokens: (0,0) rho .5 adv .5; (0,1) rho 0 adv .5; (1,0) rho 0 adv -.5; N = 3 sampled tokens
    t00 = math.exp(0.5) * 0.5 - 0.05 * 0.25
    assert float(k25_loss(LOGP, OLD, MASK, R, k=2, tau=0.1)) == pytest.approx(-(t00 + 0.5 - 0.5) / 3)
    # now sample 1's second token is sampled too, but its log-ratio -2 leaves [-1, 1]: no value, no gradient
    logp = LOGP.clone().requires_grad_(True)
    loss = k25_loss(logp, OLD, torch.ones(2, 2), R, k=2, tau=0.1, alpha=-1.0, beta=1.0)
    assert float(loss.detach()) == pytest.approx(-(t00 + 0.5 - 0.5) / 4)
    loss.backward()
    assert logp.grad[1, 1] == 0 and logp.grad[0, 0] != 0
    with pytest.raises(ValueError, match="alpha < 0 < beta"):
        k25_loss(LOGP, OLD, MASK, R, k=2, alpha=0.1)


def test_grpo_by_hand():
    adv = 0.5 / (math.sqrt(0.5) + 1e-6)  # group std of [1, 0] (unbiased) is sqrt(0.5)
    seq0 = (min(math.exp(0.5), 1.2) * adv + adv) / 2  # the 1.65 ratio is clipped to 1 + 0.2
    seq1 = -adv
    assert float(grpo_loss(LOGP, OLD, MASK, R, k=2)) == pytest.approx(-(seq0 + seq1) / 2, rel=1e-6)


@pytest.mark.parametrize("groups", [1, 3])
def test_k15_gradient_at_zero_log_ratio_is_mean_baseline_policy_gradient(groups):
    """dL/dtheta = -2 tau (1/K) sum_i (r_i - mean r) grad log pi(y_i), averaged over prompts, on a tiny
    parametrized policy (a table of logits shared by every sample) at pi = pi_old."""
    torch.manual_seed(0)
    k, t, v, tau = 4, 5, 7, 0.3
    theta = torch.randn(t, v, requires_grad=True)
    y = torch.randint(0, v, (groups * k, t))
    mask = (torch.rand(groups * k, t) > 0.3).float()
    rewards = torch.randn(groups * k)

    def logprobs():
        return theta.log_softmax(-1).expand(groups * k, t, v).gather(-1, y[..., None]).squeeze(-1)

    lp = logprobs()
    (grad,) = torch.autograd.grad(k15_loss(lp, lp.detach(), mask, rewards, k, tau), theta)
    adv = (rewards.view(groups, k) - rewards.view(groups, k).mean(1, keepdim=True)).view(-1)
    seq_logp = (logprobs() * mask).sum(-1)  # log pi(y_i) over the sampled tokens
    (pg,) = torch.autograd.grad((adv * seq_logp).view(groups, k).mean(1).mean(), theta)
    torch.testing.assert_close(grad, -2 * tau * pg, atol=1e-6, rtol=1e-5)
    assert grad.abs().max() > 1e-3


def test_token_logprobs_gathers_next_token():
    logits = torch.randn(2, 4, 6)
    ids = torch.randint(0, 6, (2, 4))
    out = token_logprobs(logits, ids)
    assert out.shape == (2, 3)
    assert float(out[1, 2]) == pytest.approx(float(logits[1, 2].log_softmax(-1)[ids[1, 3]]))


def test_statistics():
    assert all_equal_share(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), k=2) == pytest.approx(2 / 3)
    s = log_ratio_stats(torch.tensor([[0.0, -3.0]]), torch.tensor([[-2.0, -1.0]]), torch.ones(1, 2))
    assert s == pytest.approx({"log_ratio_mean": 0.0, "log_ratio_std": 2.0, "log_ratio_max_abs": 2.0,
                               "log_ratio_outside": 1.0, "seq_log_ratio_mean": 0.0})
    uniform = torch.full((1, 2, 4), math.log(0.25))
    onehot = torch.tensor([[[0.0] + [-1e9] * 3] * 2])
    assert entropy(uniform, torch.ones(1, 2)) == pytest.approx(math.log(4))
    assert entropy(onehot, torch.ones(1, 2)) == pytest.approx(0.0, abs=1e-6)
    mixed = torch.cat([uniform[:, :1], onehot[:, :1]], dim=1)
    assert entropy(mixed, torch.tensor([[1.0, 0.0]])) == pytest.approx(math.log(4))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_one_step_on_a_real_model_moves_probability_toward_rewarded_samples(name):
    """Trajectories sampled from the tiny K2 model, collated, scored by each loss: one SGD step raises
    sum_i (r_i - mean r) * log pi(y_i), i.e. likelier above-mean samples and less likely below-mean ones."""
    model = random_model(tiny_config(), seed=5).train()
    gen = torch.Generator().manual_seed(1)
    trajs = []
    for prompt in ([3, 4, 5], [7, 8]):
        for _ in range(4):
            t = Trajectory(prompt_ids=prompt, policy_version=0)
            with torch.no_grad():
                t.add_sampled(*sample_turn(model, prompt, 4, gen))
            t.set_reward({"even": sum(x % 2 == 0 for x in t.completion_ids)}, sum(x % 2 == 0 for x in t.completion_ids))
            trajs.append(t)
    batch = collate(trajs, group_size=4, pad_id=0)
    assert all_equal_share(batch.rewards, 4) < 1  # there is signal to learn from

    def seq_logp():
        return (token_logprobs(model(batch.input_ids), batch.input_ids) * batch.mask).sum(-1)

    adv = (batch.rewards.view(2, 4) - batch.rewards.view(2, 4).mean(1, keepdim=True)).view(-1)
    before = seq_logp().detach()
    lp = token_logprobs(model(batch.input_ids), batch.input_ids)
    LOSSES[name](lp, batch.old_logprobs, batch.mask, batch.rewards, 4).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
        assert float((adv * (seq_logp() - before)).sum()) > 0


@torch.no_grad()
def test_policy_stats_at_the_sampled_tokens_equal_those_of_the_full_logits():
    """RL's per-step statistics run the head on the sampled positions only; they equal the full [B, T, vocab]
    computation they replace (log-ratio to the sampler, entropy under softmax(logits / T))."""
    from k2lab.train.rl.run import policy_stats

    model = random_model(tiny_config(), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (3, 13), generator=g)
    mask = torch.zeros(3, 12)
    mask[0, 5:9], mask[1, 2:12], mask[2, 11] = 1, 1, 1
    old = torch.randn(3, 12, generator=g) - 3
    temp = 0.7
    logp_all = (model(tokens[:, :-1]).float() / temp).log_softmax(-1)
    logp = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    want = {**log_ratio_stats(logp, old, mask), "entropy": entropy(logp_all, mask)}
    got = policy_stats(model, tokens, old, mask, temp)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
