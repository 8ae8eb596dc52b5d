"""MoonViT: the K2.5/K2.6 vision encoder, its 2x2 patch merger (temporal mean for video) and the projector.

Module and parameter names are the released ones (`vision_tower.patch_embed.*`, `vision_tower.encoder.blocks.N.
{norm0,norm1,wqkv,wo,mlp.fc0,mlp.fc1}`, `mm_projector.{pre_norm,proj.0,proj.2}`), so a checkpoint loads by prefix
alone. The 2-D RoPE rotates adjacent pairs (the released layout, no permutation): pair i of a head turns by
col * f_{i/2} for even i and row * f_{i/2} for odd i, f_j = theta^(-4j/head_dim).

Several images (or video chunks) of different sizes run in one call as a packed sequence: patches are concatenated
and attention runs per image over its own slice (cu_seqlens), so nothing is padded to a common size.
Input layout (as transformers' Kimi-K2.5 processor writes it): `pixel_values` [N, 3, p, p], one row per patch, each
image in raster order (frames one after another for video); `grid_thw` [n, 3] = (frames, rows, cols) per image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from k2lab.config import ModelConfig


class MediaInputError(ValueError):
    """Bad image/video input (unreadable, over budget, placeholder mismatch): a client error (HTTP 400)."""


@dataclass
class VisionConfig:
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    merge_kernel_size: tuple[int, int] = (2, 2)
    pos_emb_height: int = 64  # learned position grid, interpolated (bicubic) to each image's patch grid
    pos_emb_width: int = 64
    pos_emb_time: int = 4  # most frames per video chunk (sinusoidal time embedding)
    rope_theta: float = 10000.0
    projector_ln_eps: float = 1e-5
    text_hidden_size: int = 7168  # projector output = the language model's hidden size

    def __post_init__(self) -> None:
        self.merge_kernel_size = tuple(self.merge_kernel_size)
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(f"hidden_size {self.hidden_size} / {self.num_attention_heads} heads must give a "
                             "head_dim divisible by 4 (2-D RoPE rotates row and column pairs)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def merge_size(self) -> int:
        return self.merge_kernel_size[0] * self.merge_kernel_size[1]

    @classmethod
    def preset(cls, name: str) -> "VisionConfig":
        if name not in VISION_PRESETS:
            raise ValueError(f"unknown vision preset {name!r}; choose one of {', '.join(VISION_PRESETS)}")
        return cls(**VISION_PRESETS[name])

    # Released config.json (Moonshot's remote code) spells some fields differently from transformers.
    _RELEASED = {"vt_hidden_size": "hidden_size", "vt_intermediate_size": "intermediate_size",
                 "vt_num_hidden_layers": "num_hidden_layers", "vt_num_attention_heads": "num_attention_heads",
                 "init_pos_emb_height": "pos_emb_height", "init_pos_emb_width": "pos_emb_width",
                 "init_pos_emb_time": "pos_emb_time", "projector_ln_eps": "projector_ln_eps"}

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        """Read a `vision_config` in either the released (vt_*) or the transformers spelling."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.update({ours: d[theirs] for theirs, ours in cls._RELEASED.items() if theirs in d})
        if "rope_theta" in (d.get("rope_parameters") or {}):
            kw["rope_theta"] = d["rope_parameters"]["rope_theta"]
        return cls(**kw)

    def to_dict(self) -> dict:
        """The `vision_config` of a checkpoint: released keys plus transformers' keys, so both can open it."""
        hf = dataclasses.asdict(self)
        hf["merge_kernel_size"] = list(self.merge_kernel_size)
        hf.pop("rope_theta")
        released = {theirs: hf[ours] for theirs, ours in self._RELEASED.items()}
        return {**released, **hf, "mm_hidden_size": self.hidden_size, "merge_type": "sd2_tpool",
                "mm_projector_type": "patchmerger", "pos_emb_type": "divided_fixed",
                "video_attn_type": "spatial_temporal", "projector_hidden_act": "gelu",
                "hidden_act": "gelu_pytorch_tanh",
                "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta}}


VISION_PRESETS: dict[str, dict] = {
    "moonvit": {},
    # tiny: a pos grid smaller than typical test images so the interpolation is exercised.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 pos_emb_height=8, pos_emb_width=8, text_hidden_size=256),
}


def sincos_time_embedding(num_frames: int, dim: int) -> torch.Tensor:
    """[num_frames, dim]: [sin(f * w_i) | cos(f * w_i)], w_i = 10000^(-2i/dim)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.arange(num_frames, dtype=torch.float32)[:, None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class PositionEmbedding(nn.Module):
    """Learned [H, W, D] grid resampled (bicubic) to each image's grid; video frames also get a time sinusoid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.pos_emb_height, cfg.pos_emb_width, cfg.hidden_size))

    def forward(self, x: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        parts = []
        for t, h, w in grid_thw:
            # bicubic resampling is separable: pos = A_h @ grid @ A_w^T, with A_h [h, H], A_w [w, W] (two small
            # matmuls; F.interpolate on the [D, H, W] grid itself is several times slower on CPU)
            a_h = bicubic_matrix(self.weight.shape[0], h).to(self.weight)
            a_w = bicubic_matrix(self.weight.shape[1], w).to(self.weight)
            rows = (a_h @ self.weight.flatten(1)).view(h, self.weight.shape[1], -1)  # [h, W, D]
            pos = (a_w @ rows).flatten(0, 1)  # [h, w, D] -> [h*w, D]
            pos = pos.unsqueeze(0).expand(t, -1, -1)  # [t, h*w, D]
            if t > 1:  # single images get no time term
                pos = pos + sincos_time_embedding(t, pos.shape[-1]).to(pos)[:, None]
            parts.append(pos.flatten(0, 1))
        return x + torch.cat(parts).to(x.dtype)


def bicubic_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """[size_out, size_in]: F.interpolate's bicubic (align_corners=False, border-clamped) resampling as a matrix,
    read off by resampling the identity (column i = where input position i goes)."""
    eye = torch.eye(size_in).view(1, size_in, size_in, 1)  # channel i: a unit impulse at position i
    return F.interpolate(eye, size=(size_out, 1), mode="bicubic", align_corners=False)[0, :, :, 0].T


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_emb = PositionEmbedding(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: list) -> torch.Tensor:
        # a stride-p convolution over one p x p patch is a matmul: [N, 3*p*p] @ [3*p*p, D] (faster than conv2d)
        x = F.linear(pixel_values.flatten(1), self.proj.weight.flatten(1), self.proj.bias)
        return self.pos_emb(x, grid_thw)


def rope_2d(grid_thw: list, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """[N, 1, head_dim/2] complex rotations: pair 2j turns by col * f_j, pair 2j+1 by row * f_j."""
    freqs = theta ** (-torch.arange(0, head_dim, 4, device=device, dtype=torch.float32) / head_dim)
    parts = []
    for t, h, w in grid_thw:
        rows = torch.arange(h, device=device).repeat_interleave(w).repeat(t)
        cols = torch.arange(w, device=device).repeat(h * t)
        parts.append(torch.stack([cols[:, None] * freqs, rows[:, None] * freqs], dim=-1).flatten(1))
    angles = torch.cat(parts)
    return torch.polar(torch.ones_like(angles), angles).unsqueeze(1)


def apply_rope_2d(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [N, H, hd]: adjacent pairs as complex numbers times rotation [N, 1, hd/2], in fp32."""
    x_c = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(x_c * rotation).flatten(-2).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc0 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc1 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm0(x)), then + mlp(norm1(x)); attention packed over images."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.norm0 = nn.LayerNorm(cfg.hidden_size, eps=1e-5)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-5)
        self.wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # rows: q | k | v, heads contiguous
        self.wo = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.mlp = VisionMLP(cfg)

    def attention(self, x: torch.Tensor, rope: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        q, k, v = self.wqkv(x).unflatten(-1, (3, self.n_heads, self.head_dim)).unbind(1)  # [N, H, hd] each
        q, k = apply_rope_2d(q, rope), apply_rope_2d(k, rope)
        out = []
        # [1, H, L_i, hd] per image: 4-D inputs take SDPA's fused kernel (3-D ones fall back to the math path)
        for qi, ki, vi in zip(*(t.transpose(0, 1).unsqueeze(0).split(seqlens, dim=2) for t in (q, k, v))):
            out.append(F.scaled_dot_product_attention(qi, ki, vi)[0])
        return self.wo(torch.cat(out, dim=1).transpose(0, 1).flatten(1))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = x + self.attention(self.norm0(x), rope, seqlens)
        return x + self.mlp(self.norm1(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=1e-5)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, rope, seqlens)
        return self.final_layernorm(x)


def temporal_patch_merge(x: torch.Tensor, grid_thw: list, kh: int, kw: int) -> torch.Tensor:
    """[N, D] -> [M, kh*kw, D]: group each kh x kw block of patches (raster order inside the block), mean over t."""
    out = []
    for xi, (t, h, w) in zip(x.split([t * h * w for t, h, w in grid_thw]), grid_thw):
        xi = xi.view(t, h // kh, kh, w // kw, kw, -1).permute(0, 1, 3, 2, 4, 5)  # [t, h/kh, w/kw, kh, kw, D]
        out.append(xi.float().mean(0).flatten(0, 1).flatten(1, 2).to(x.dtype))
    return torch.cat(out)


class MoonViT(nn.Module):
    """The vision tower: patches of several images -> merged tokens [M, kh*kw, D] (before the projector)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.encoder = VisionEncoder(cfg)

    def check_inputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
        cfg = self.config
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise MediaInputError(f"grid_thw must be [num_images, 3], got shape {tuple(grid_thw.shape)}")
        grid = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        kh, kw = cfg.merge_kernel_size
        for i, (t, h, w) in enumerate(grid):
            if not (1 <= t <= cfg.pos_emb_time and h > 0 and w > 0 and h % kh == 0 and w % kw == 0):
                raise MediaInputError(f"image {i}: grid (t={t}, h={h}, w={w}) must have 1 <= t <= "
                                      f"{cfg.pos_emb_time} and h, w positive multiples of {kh}x{kw}")
        expected = (sum(t * h * w for t, h, w in grid), 3, cfg.patch_size, cfg.patch_size)
        if tuple(pixel_values.shape) != expected:
            raise MediaInputError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected {expected} "
                                  f"for grid_thw {grid}")
        return grid

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid = self.check_inputs(pixel_values, grid_thw)
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype), grid)
        rope = rope_2d(grid, self.config.head_dim, self.config.rope_theta, device=x.device)
        x = self.encoder(x, rope, [t * h * w for t, h, w in grid])  # a video chunk attends across its frames
        return temporal_patch_merge(x, grid, *self.config.merge_kernel_size)


class Projector(nn.Module):
    """mm_projector: LayerNorm per patch, concatenate the kh*kw patches of a merged token, 2-layer GELU MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        merged = cfg.hidden_size * cfg.merge_size
        self.pre_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.projector_ln_eps)
        self.proj = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.text_hidden_size))

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pre_norm(merged).flatten(1))  # [M, kh*kw, D] -> [M, text_hidden]


def init_vision_weights(module: nn.Module, std: float = 0.02) -> None:
    """Random init for fresh models: normal(0, std) weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PositionEmbedding):
            nn.init.normal_(m.weight, std=std)


# Which vision preset goes with a ModelConfig preset (text-only models have none).
MODEL_VISION_PRESET = {"kimi-k2.5": "moonvit", "kimi-k2.6": "moonvit", "tiny": "tiny"}


def vision_param_counts(model: str | ModelConfig) -> dict[str, int]:
    """Parameter counts of the vision encoder and projector, built on the meta device, for a model preset name
    or a ModelConfig whose kimi_k25 wrapper has a vision_config; {} for a text-only model."""
    if isinstance(model, str):
        text = ModelConfig.preset(model)
        if model not in MODEL_VISION_PRESET:
            return {}
        cfg = VisionConfig.preset(MODEL_VISION_PRESET[model])
    else:
        text = model
        if not (model.wrapper or {}).get("vision_config"):
            return {}
        cfg = VisionConfig.from_dict(model.wrapper["vision_config"])
    cfg = dataclasses.replace(cfg, text_hidden_size=text.hidden_size)
    with torch.device("meta"):
        encoder, projector = MoonViT(cfg), Projector(cfg)
    n_enc = sum(p.numel() for p in encoder.parameters())
    n_proj = sum(p.numel() for p in projector.parameters())
    return {"vision_encoder": n_enc, "projector": n_proj, "vision_total": n_enc + n_proj}
