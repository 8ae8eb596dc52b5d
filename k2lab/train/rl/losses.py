"""RL losses as pure functions on tensors, and the per-step statistics that go with them.

Shapes: B = G*K rows (K consecutive samples per prompt), T target positions. `logprobs` [B, T] are the current
policy's log-probs of the sampled tokens (with gradient), `old_logprobs` [B, T] those of the policy that sampled
them, `mask` [B, T] 1 on sampled tokens (0 on prompt, environment and padding), `rewards` [B].

- `k15_loss` (default, the K1.5/K2 objective, REFERENCE §5):
  L = mean over prompts of (1/K) sum_i (r_i - mean_r - tau * log(pi(y_i)/pi_old(y_i)))^2, with the sequence
  log-ratio the sum of the masked token log-ratios. At zero log-ratio its gradient is
  -2*tau * (1/K) sum_i (r_i - mean_r) grad log pi(y_i): a mean-baseline policy gradient.
- `k25_loss`: our reading of the K2.5 token-level objective: per token the importance-weighted advantage
  exp(rho_t) * (r_i - mean_r) minus tau/2 * rho_t^2, averaged over the group's sampled tokens, with tokens whose
  log-ratio rho_t leaves [alpha, beta] masked out (zero gradient whatever the sign of the advantage).
- `grpo_loss`: the GRPO-style baseline: advantages normalized by the group's std, PPO's clipped surrogate per
  token, averaged per sequence then over sequences; no KL term.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log pi(input_ids[:, t+1] | ..t) from logits [B, T, V]: [B, T-1] (float32)."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def _grouped(rewards: torch.Tensor, k: int) -> torch.Tensor:
    if rewards.dim() != 1 or k < 1 or rewards.numel() % k:
        raise ValueError(f"rewards must be [G*K] with K={k}, got shape {tuple(rewards.shape)}")
    return rewards.view(-1, k)


def mean_baseline_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """r_i - mean of its group's rewards: [B]."""
    r = _grouped(rewards, k)
    return (r - r.mean(dim=1, keepdim=True)).view(-1)


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y)/pi_old(y) per row: the sum of the masked token log-ratios, [B]."""
    return ((logprobs - old_logprobs) * mask).sum(dim=-1)


def k15_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
             k: int, tau: float = 0.1) -> torch.Tensor:
    adv = mean_baseline_advantages(rewards, k)
    residual = adv - tau * sequence_log_ratio(logprobs, old_logprobs, mask)
    return residual.pow(2).view(-1, k).mean(dim=1).mean()  # (1/K) sum over samples, mean over prompts


def k25_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
             k: int, tau: float = 0.1, alpha: float = -1.0, beta: float = 1.0) -> torch.Tensor:
    if not alpha < 0 < beta:
        raise ValueError(f"k25_loss: need alpha < 0 < beta so on-policy tokens train, got [{alpha}, {beta}]")
    rho = logprobs - old_logprobs
    inside = ((rho >= alpha) & (rho <= beta)).to(mask.dtype).detach()
    adv = mean_baseline_advantages(rewards, k)[:, None]
    objective = torch.exp(rho) * adv - 0.5 * tau * rho.pow(2)
    kept = mask * inside
    # average over every sampled token of the group (masked tokens still count in N, as they were sampled)
    tokens = mask.view(-1, k, mask.shape[-1]).sum(dim=(1, 2)).clamp(min=1)
    per_group = (objective * kept).view(-1, k, mask.shape[-1]).sum(dim=(1, 2)) / tokens
    return -per_group.mean()


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
              k: int, clip_eps: float = 0.2, eps: float = 1e-6) -> torch.Tensor:
    r = _grouped(rewards, k)
    adv = ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)).view(-1, 1)
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_seq = (surrogate * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return -per_seq.mean()


LOSSES = {"k15": k15_loss, "k25": k25_loss, "grpo": grpo_loss}


# ---- per-step statistics ----

def all_equal_share(rewards: torch.Tensor, k: int) -> float:
    """Share of groups whose K rewards are all equal: they carry no learning signal under a group baseline."""
    r = _grouped(rewards, k)
    return float((r == r[:, :1]).all(dim=1).float().mean())


@torch.no_grad()
def log_ratio_stats(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                    alpha: float = -1.0, beta: float = 1.0) -> dict[str, float]:
    """Token log-ratio mean, std, max |.|, the share outside [alpha, beta], and the mean sequence log-ratio."""
    rho = (logprobs - old_logprobs)[mask.bool()].float()
    if rho.numel() == 0:
        return {"log_ratio_mean": 0.0, "log_ratio_std": 0.0, "log_ratio_max_abs": 0.0, "log_ratio_outside": 0.0,
                "seq_log_ratio_mean": 0.0}
    return {"log_ratio_mean": float(rho.mean()), "log_ratio_std": float(rho.std(unbiased=False)),
            "log_ratio_max_abs": float(rho.abs().max()),
            "log_ratio_outside": float(((rho < alpha) | (rho > beta)).float().mean()),
            "seq_log_ratio_mean": float(sequence_log_ratio(logprobs, old_logprobs, mask).mean())}


@torch.no_grad()
def entropy(log_probs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean policy entropy -sum_v p log p over masked positions, from full log-prob rows [B, T, V]."""
    h = -(log_probs.float().exp() * log_probs.float()).sum(dim=-1)
    return float((h * mask).sum() / mask.sum().clamp(min=1))
