"""Trajectories are token in, token out: what `collate` lays out matches what the policy sampled, token for
token, and environment tokens never enter the loss."""

import pytest
import torch

from k2lab.train.rl.losses import token_logprobs
from k2lab.train.rl.trajectory import Trajectory, collate
from tests.conftest import random_model, tiny_config


def sample_turn(model, ids: list[int], n: int, gen: torch.Generator) -> tuple[list[int], list[float]]:
    """n tokens sampled one at a time at temperature 1, with the log-prob each was sampled with."""
    out, lps = [], []
    for _ in range(n):
        logp = model(torch.tensor([ids + out]))[0, -1].float().log_softmax(-1)
        tok = int(torch.multinomial(logp.exp(), 1, generator=gen))
        out.append(tok)
        lps.append(float(logp[tok]))
    return out, lps


@torch.no_grad()
def test_collate_aligns_sampling_logprobs_and_excludes_environment_tokens():
    model = random_model(tiny_config(), seed=1)
    gen = torch.Generator().manual_seed(0)
    trajs = []
    for i, (prompt, env) in enumerate([([5, 6, 7], [40, 41]), ([9, 10], [50, 51, 52])]):
        t = Trajectory(prompt_ids=prompt, policy_version=3)
        ids, lps = sample_turn(model, prompt, 3 + i, gen)
        t.add_sampled(ids, lps)
        t.add_environment(env)  # a tool result: in the context, never trained
        ids2, lps2 = sample_turn(model, prompt + t.completion_ids, 2, gen)
        t.add_sampled(ids2, lps2)
        t.set_reward({"verifiable": 1.0 - i}, 1.0 - i)
        trajs.append(t)
    batch = collate(trajs, group_size=2, pad_id=0)
    now = token_logprobs(model(batch.input_ids), batch.input_ids)
    m = batch.mask.bool()
    assert int(m.sum()) == sum(t.sampled_tokens for t in trajs) == (3 + 2) + (4 + 2)
    torch.testing.assert_close(now[m], batch.old_logprobs[m], atol=1e-5, rtol=0)
    for row, t in enumerate(trajs):
        p = len(t.prompt_ids)
        targets = batch.input_ids[row, 1:][m[row]].tolist()
        assert targets == [tok for tok, keep in zip(t.completion_ids, t.loss_mask) if keep]
        env_targets = batch.mask[row, p - 1: p - 1 + len(t.completion_ids)]
        assert env_targets.tolist() == [float(x) for x in t.loss_mask]
    assert batch.rewards.tolist() == [1.0, 0.0] and batch.policy_versions.tolist() == [3, 3]
    assert Trajectory.from_dict(trajs[0].to_dict()) == trajs[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_ids=[]), "prompt_ids is empty"),
    (dict(prompt_ids=[1], completion_ids=[2], logprobs=[], loss_mask=[1]), "one entry per completion token"),
    (dict(prompt_ids=[1], completion_ids=[2], logprobs=[0.5], loss_mask=[1]), "finite and <= 0"),
    (dict(prompt_ids=[1], completion_ids=[2], logprobs=[-0.5], loss_mask=[2]), "0 or 1"),
])
def test_bad_trajectories_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trajectory(policy_version=0, **kwargs)


def test_collate_needs_whole_groups():
    t = Trajectory(prompt_ids=[1], policy_version=0)
    with pytest.raises(ValueError, match="groups of 2"):
        collate([t], group_size=2, pad_id=0)
