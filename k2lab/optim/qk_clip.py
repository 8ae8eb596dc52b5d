"""QK-Clip (K2 paper, Algorithm 1), applied per head to MLA after the optimizer step.

Written by hand: no library knows MLA's split of q and k into a per-head no-position part (q_nope, k_nope,
both in up-projections) and a rotary part (q_rope per head, k_rope shared by all heads). Scaling q_nope and
k_nope rows by sqrt(gamma) and q_rope rows by gamma multiplies every logit of the head by gamma, while v rows
and the shared k_rope (which other heads use) stay untouched (REFERENCE §4).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def mla_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules that record max logits, in layer order."""
    return [m for m in model.modules() if hasattr(m, "track_max_logits") and hasattr(m, "kv_b_proj")]


def track_max_logits(model: nn.Module, on: bool = True) -> None:
    for mla in mla_layers(model):
        mla.track_max_logits = on


def _scale_rows_(weight: torch.Tensor, row_scale: torch.Tensor) -> None:
    col = row_scale.to(weight.dtype)[:, None]
    if isinstance(weight, DTensor):  # FSDP2: scale this rank's rows of the sharded weight
        col = distribute_tensor(col.expand(-1, weight.shape[1]).contiguous(), weight.device_mesh,
                                weight.placements, src_data_rank=None)
    weight.mul_(col)


@torch.no_grad()
def qk_clip_(model: nn.Module, tau: float = 100.0, max_logits: list[torch.Tensor] | None = None) -> list[dict]:
    """Clip each MLA head whose max logit S_max exceeds tau; return per layer {max_logit, heads_clipped}.

    max_logits: per layer [n_heads] S_max of this step (default: each layer's recorded `max_logits`). Under
    torch.distributed the maxima are reduced over ranks first, so every rank clips the same heads.
    """
    layers = mla_layers(model)
    if max_logits is None:
        missing = [i for i, m in enumerate(layers) if getattr(m, "max_logits", None) is None]
        if missing:
            raise RuntimeError(f"MLA layers {missing} recorded no max_logits; call track_max_logits(model) first")
        max_logits = [m.max_logits for m in layers]
    stats = []
    for mla, s_max in zip(layers, max_logits):
        s_max = s_max.detach().float().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(s_max, op=dist.ReduceOp.MAX)
        H, nope, rope, v = mla.n_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        clipped = s_max > tau
        gamma = torch.where(clipped, tau / s_max, torch.ones_like(s_max))  # [H]
        if clipped.any():
            q_proj = mla.q_b_proj if getattr(mla, "q_b_proj", None) is not None else mla.q_proj
            # q rows per head: nope then rope; kv_b rows per head: k_nope then v.
            q_scale = torch.cat([gamma.sqrt()[:, None].expand(H, nope), gamma[:, None].expand(H, rope)], 1)
            kv_scale = torch.cat([gamma.sqrt()[:, None].expand(H, nope), torch.ones(H, v)], 1)
            _scale_rows_(q_proj.weight, q_scale.reshape(-1).to(q_proj.weight.device))
            _scale_rows_(mla.kv_b_proj.weight, kv_scale.reshape(-1).to(mla.kv_b_proj.weight.device))
        stats.append({"max_logit": float(s_max.max()), "heads_clipped": int(clipped.sum())})
    return stats
