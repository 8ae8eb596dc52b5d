"""A trajectory is token in, token out: the ids the policy saw and produced, never re-tokenized from text.

One episode, possibly multi-turn: `prompt_ids` (the rendered conversation up to the first generation prompt),
then `completion_ids`, everything after it in order: tokens the policy sampled (loss_mask 1, with the
log-probability it sampled them with) interleaved with environment tokens (tool results, user turns, the next
generation prompt; loss_mask 0, log-prob 0). `reward` is the total, `rewards` its components; `policy_version`
is the optimizer step of the weights that sampled it (for staleness accounting).

`collate` lays a list of trajectories (groups of K consecutive samples of one prompt) out as tensors aligned
with next-token prediction: position t of `mask` / `old_logprobs` belongs to the token predicted from position t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Trajectory:
    prompt_ids: list[int]
    policy_version: int
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # per completion token; 0.0 on environment tokens
    loss_mask: list[int] = field(default_factory=list)  # 1 on sampled tokens, 0 on environment tokens
    reward: float = 0.0
    rewards: dict[str, float] = field(default_factory=dict)
    finish_reason: str = ""

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("Trajectory: prompt_ids is empty; a policy samples after at least one token")
        n = len(self.completion_ids)
        if len(self.logprobs) != n or len(self.loss_mask) != n:
            raise ValueError(f"Trajectory: completion_ids ({n}), logprobs ({len(self.logprobs)}) and loss_mask "
                             f"({len(self.loss_mask)}) must have one entry per completion token")
        self._check(self.logprobs, self.loss_mask)

    @staticmethod
    def _check(logprobs: list[float], mask: list[int]) -> None:
        for lp, m in zip(logprobs, mask):
            if m not in (0, 1):
                raise ValueError(f"Trajectory: loss_mask entries are 0 or 1, got {m!r}")
            if m and not (math.isfinite(lp) and lp <= 0.0):
                raise ValueError(f"Trajectory: a sampled token's log-prob must be finite and <= 0, got {lp}")

    def add_sampled(self, ids: list[int], logprobs: list[float]) -> None:
        """Append tokens the policy sampled, with the log-probs it sampled them with (loss mask 1)."""
        if len(ids) != len(logprobs):
            raise ValueError(f"add_sampled: {len(ids)} ids but {len(logprobs)} log-probs")
        self._check(logprobs, [1] * len(ids))
        self.completion_ids += ids
        self.logprobs += [float(x) for x in logprobs]
        self.loss_mask += [1] * len(ids)

    def add_environment(self, ids: list[int]) -> None:
        """Append tokens the environment wrote (tool results, user turns, generation prompts): never trained."""
        self.completion_ids += ids
        self.logprobs += [0.0] * len(ids)
        self.loss_mask += [0] * len(ids)

    def set_reward(self, components: dict[str, float], total: float) -> None:
        self.rewards, self.reward = dict(components), float(total)

    @property
    def sampled_tokens(self) -> int:
        return sum(self.loss_mask)

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "completion_ids": self.completion_ids, "logprobs": self.logprobs,
                "loss_mask": self.loss_mask, "reward": self.reward, "rewards": self.rewards,
                "policy_version": self.policy_version, "finish_reason": self.finish_reason}

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        return cls(**d)


@dataclass
class RLBatch:
    """Tensors for one update; T = longest prompt + completion. Row b holds trajectories[b]."""

    input_ids: torch.Tensor  # [B, T] right-padded
    mask: torch.Tensor  # [B, T-1] float, 1 where the token at t+1 was sampled by the policy
    old_logprobs: torch.Tensor  # [B, T-1] the sampling log-prob of the token at t+1 (0 elsewhere)
    rewards: torch.Tensor  # [B] total rewards
    group_size: int  # K: rows [g*K, (g+1)*K) are samples of one prompt
    policy_versions: torch.Tensor  # [B]


def collate(trajectories: list[Trajectory], group_size: int, pad_id: int) -> RLBatch:
    """Pad and align a list of G*K trajectories (K consecutive samples per prompt)."""
    if not trajectories or group_size < 1 or len(trajectories) % group_size:
        raise ValueError(f"collate: need a non-empty list of groups of {group_size}, got {len(trajectories)}")
    width = max(len(t.prompt_ids) + len(t.completion_ids) for t in trajectories)
    b = len(trajectories)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros(b, width - 1)
    old = torch.zeros(b, width - 1)
    for i, t in enumerate(trajectories):
        p, n = len(t.prompt_ids), len(t.completion_ids)
        input_ids[i, : p + n] = torch.tensor(t.prompt_ids + t.completion_ids)
        # completion token j sits at position p+j and is predicted from position p+j-1
        mask[i, p - 1: p - 1 + n] = torch.tensor(t.loss_mask, dtype=torch.float32)
        old[i, p - 1: p - 1 + n] = torch.tensor(t.logprobs, dtype=torch.float32)
    return RLBatch(input_ids, mask, old, torch.tensor([t.reward for t in trajectories], dtype=torch.float32),
                   group_size, torch.tensor([t.policy_version for t in trajectories]))
