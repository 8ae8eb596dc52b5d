"""YaRN rotary embedding on the interleaved (adjacent-pair) layout of the released K2 weights (REFERENCE §3)."""

from __future__ import annotations

import math

import torch
from torch import nn

from k2lab.config import ModelConfig, yarn_mscale


def yarn_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] and the cos/sin scale (1.0 for Kimi, whose mscale == mscale_all_dim)."""
    d, base = config.qk_rope_head_dim, config.rope_theta
    inv_extra = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    rs = config.rope_scaling
    if not rs:
        return inv_extra, 1.0
    factor, l0 = rs["factor"], rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def corr(rotations: float) -> float:  # the dimension whose wavelength makes `rotations` turns over l0
        return d * math.log(l0 / (2 * math.pi * rotations)) / (2 * math.log(base))

    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = (inv_extra / factor) * ramp + inv_extra * (1 - ramp)
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    scale = rs.get("attention_factor") or (yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all
                                           else yarn_mscale(factor, 1))
    return inv_freq, scale


class RotaryEmbedding(nn.Module):
    """Rotations e^{i * position * inv_freq} for given positions, as complex numbers [.., T, rope_dim/2];
    computed on the fly (no max-length table to allocate)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.scale = yarn_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.config = config

    def reset(self, device: torch.device | str) -> None:
        """Recompute the buffer (after building on the meta device and loading weights)."""
        self.inv_freq = yarn_inv_freq(self.config)[0].to(device)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # [..., T, d/2]
        return torch.polar(torch.full_like(angles, self.scale), angles)  # scale * (cos + i sin)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent pairs (x0, x1), (x2, x3), ... of x [B, T, (H,) d] by rotation [B or 1, T, d/2]:
    each pair is one complex number, multiplied by its rotation (the DeepSeek-V3 layout of the released
    weights; one complex multiply instead of a dozen real ops)."""
    if x.dim() == 4:  # [B, T, H, d]: broadcast over heads
        rotation = rotation.unsqueeze(2)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)
