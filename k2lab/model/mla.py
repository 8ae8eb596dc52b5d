"""Multi-head latent attention (MLA) with a full path for training/prefill and an absorbed path for decoding.

Written by hand because no library provides the absorbed form: at decode time only the normalized latent
c_kv [kv_lora_rank] and the rotated shared rope key [qk_rope_head_dim] are cached per token and layer; kv_b's
k_nope block is folded into the query and its v block into the output, so no per-head key or value is ever
materialized for the cached context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from k2lab.config import ModelConfig
from k2lab.model.norm import RMSNorm
from k2lab.model.rope import apply_rope


class LatentCache:
    """The decode cache: per layer and slot, [c_kv | k_rope] for each position: `kv` holds one [slots, max_len,
    r + rope] tensor per layer (separate tensors, so the compiled decode step of k2lab.model.decode can update
    one layer's in place without copying the others)."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.kv_lora_rank = config.kv_lora_rank
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.kv = [torch.zeros(slots, max_len, width, dtype=dtype, device=device)
                   for _ in range(config.num_hidden_layers)]

    @property
    def max_len(self) -> int:
        return self.kv[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(kv.numel() * kv.element_size() for kv in self.kv)


@dataclass
class CacheBatch:
    """Where a forward pass reads and writes the cache: cache rows, token positions [B, T] and the mask."""

    cache: LatentCache
    rows: torch.Tensor  # [B] cache slot of each batch row
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, 1, T, S] True where key position s <= query position
    contiguous: bool  # rows == arange(B): slice the cache instead of gathering

    @classmethod
    def build(cls, cache: LatentCache, positions: torch.Tensor, rows: torch.Tensor | None) -> "CacheBatch":
        bsz = positions.shape[0]
        if rows is None:
            rows = torch.arange(bsz, device=positions.device)
        ctx_len = int(positions.max()) + 1
        if ctx_len > cache.max_len:
            raise ValueError(f"position {ctx_len - 1} is beyond the cache length {cache.max_len}")
        keys = torch.arange(ctx_len, device=positions.device)
        mask = keys[None, None, None, :] <= positions[:, None, :, None]
        contiguous = bool((rows == torch.arange(bsz, device=rows.device)).all())
        return cls(cache, rows, positions, mask, contiguous)

    def write_and_read(self, layer: int, new: torch.Tensor) -> torch.Tensor:
        """Store new [B, T, r+rope] at (rows, positions); return the context [B, S, r+rope] for this layer."""
        kv = self.cache.kv[layer]
        kv[self.rows[:, None], self.positions] = new.to(kv.dtype)
        ctx_len = self.mask.shape[-1]
        if self.contiguous:
            return kv[: len(self.rows), :ctx_len]
        return kv[self.rows, :ctx_len]


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h = config.hidden_size, config.num_attention_heads
        self.n_heads = h
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.softmax_scale = config.softmax_scale
        bias = config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)  # eps 1e-6 whatever rms_norm_eps is, as in HF
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, config.kv_lora_rank + config.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_head_dim, d, bias=bias)
        # Absorbed attention beats expanding kv_b over the context while T is below this many query tokens.
        per_pair = 2 * self.kv_lora_rank + self.qk_rope_head_dim - self.qk_head_dim - self.v_head_dim
        self.absorb_below = self.kv_lora_rank * (self.qk_nope_head_dim + self.v_head_dim) / max(per_pair, 1)
        # QK-Clip: when set, full-path forwards store softmax_scale * max_{i>=j} q_i.k_j per head.
        self.track_max_logits = False
        self.max_logits: torch.Tensor | None = None

    def _query(self, x: torch.Tensor, rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, t, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(bsz, t, self.n_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, rotation)

    def _latent(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """[normalized c_kv | rotated k_rope] per token: [B, T, r + rope], exactly what the cache holds."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(c_kv), apply_rope(k_rope, rotation)], dim=-1)

    def _expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head k_nope, v [B, S, H, .] and the shared k_rope [B, S, rope] from latents [B, S, r + rope]."""
        bsz, s, _ = latent.shape
        c_kv, k_rope = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(bsz, s, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        return k_nope, v, k_rope

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, batch: CacheBatch | None = None,
                layer: int = 0, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D]; rotation [B or 1, T, rope/2] (complex, from RotaryEmbedding) -> [B, T, D].
        attn_mask [B, 1, T, T] (True = may attend), without a cache only: replaces the causal mask (packing)."""
        bsz, t, _ = x.shape
        q_nope, q_rope = self._query(x, rotation)
        latent = self._latent(x, rotation)
        if batch is not None:
            latent = batch.write_and_read(layer, latent)
            if t < self.absorb_below:
                return self.o_proj(self._absorbed(q_nope, q_rope, latent, batch.mask).reshape(bsz, t, -1))
        k_nope, v, k_rope = self._expand(latent)
        s = latent.shape[1]
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, T, qk]
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(bsz, s, self.n_heads, -1)], dim=-1).transpose(1, 2)
        if self.v_head_dim < self.qk_head_dim:  # equal head dims let SDPA use its fused (flash) CPU kernel
            v = F.pad(v, (0, self.qk_head_dim - self.v_head_dim))
        v = v.transpose(1, 2)
        if batch is None:
            if self.track_max_logits:
                self.max_logits = self._max_logits(q, k, attn_mask)
            if attn_mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, scale=self.softmax_scale)
        out = out[..., : self.v_head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(bsz, t, -1))

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, ctx: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """Attention against cached latents ctx [B, S, r + rope]; returns [B, T, H, v]."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # k_nope folded into the query
        scores = torch.einsum("bthc,bsc->bhts", torch.cat([q_lat, q_rope], dim=-1), ctx) * self.softmax_scale
        probs = scores.float().masked_fill(~mask, float("-inf")).softmax(dim=-1).to(ctx.dtype)
        o_lat = torch.einsum("bhts,bsr->bthr", probs, ctx[..., : self.kv_lora_rank])
        return torch.einsum("bthr,hvr->bthv", o_lat, w_uv)  # v folded into the output

    @torch.no_grad()
    def _max_logits(self, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """softmax_scale * max over batch and attended pairs (causal, or attn_mask) of q.k, per head, chunked
        over queries: [H] fp32."""
        bsz, h, t, _ = q.shape
        chunk = max(1, (1 << 22) // max(1, bsz * h * t))
        best = torch.full((h,), float("-inf"), device=q.device)
        keys = torch.arange(t, device=q.device)
        for start in range(0, t, chunk):
            qc = q[:, :, start:start + chunk].float()
            scores = qc @ k.float().transpose(-1, -2)  # [B, H, c, T]
            if attn_mask is None:
                allowed = keys[None, :] <= torch.arange(start, start + qc.shape[2], device=q.device)[:, None]
            else:
                allowed = attn_mask[:, :, start:start + qc.shape[2]]
            scores = scores.masked_fill(~allowed, float("-inf"))
            best = torch.maximum(best, scores.amax(dim=(0, 2, 3)))
        return best * self.softmax_scale
