"""MoE load balancing: the aux-loss-free bias update (DeepSeek-V3, used by K2), the optional sequence-wise
auxiliary loss, and the imbalance metric (max load / mean load) per MoE layer."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "gate") and hasattr(m.gate, "e_score_correction_bias")]


def imbalance(load: torch.Tensor) -> float:
    """max load / mean load: 1.0 is perfectly balanced, E/k means all tokens on k experts."""
    load = load.float()
    return float(load.max() / load.mean().clamp(min=1e-9))


@torch.no_grad()
def update_bias_(model: nn.Module, gamma: float = 1e-3, loads: list[torch.Tensor] | None = None) -> list[float]:
    """bias += gamma * sign(mean load - load) for each MoE router; returns each layer's imbalance.

    loads: per MoE layer [E] tokens routed this step (default: each layer's `last_load`); summed over ranks
    under torch.distributed so every rank moves its bias the same way.
    """
    layers = moe_layers(model)
    if loads is None:
        loads = [m.last_load for m in layers]
    out = []
    for moe, load in zip(layers, loads):
        load = load.detach().float().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        bias = moe.gate.e_score_correction_bias
        bias.add_(gamma * torch.sign(load.mean() - load).to(bias))
        out.append(imbalance(load))
    return out


def sequence_aux_loss(scores: torch.Tensor, topk_idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences.

    scores [B, T, E]: router affinities s (sigmoid); topk_idx [B, T, k]: chosen experts.
    L = alpha * sum_e f_e * P_e with f_e = E/(k*T) * #tokens routed to e, P_e = mean_t s_e / sum_j s_j.
    """
    B, T, E = scores.shape
    k = topk_idx.shape[-1]
    counts = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, topk_idx.reshape(B, -1), torch.ones(B, T * k, device=scores.device))
    f = counts * E / (k * T)
    P = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return alpha * (f * P).sum(-1).mean()
