"""The K2 INT4 scheme: symmetric 4-bit integers, one scale per 32 inputs (W4A16), and its int32 packing.

Quantization follows compressed-tensors' minmax rule so that k2lab and the released checkpoints agree bit
for bit: per group of `group_size` consecutive inputs, `scale = max|w| / 7.5`, `q = round(clamp(w / scale,
-8, 7))` (round half to even), `w ~ q * scale`. Scales are stored in bf16, as in the released checkpoints.
Packing puts 8 values in one int32, element i at bits 4i, each stored as q + 8.
"""

from __future__ import annotations

import torch

BITS = 4
GROUP_SIZE = 32
QMIN, QMAX = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1  # -8, 7
PER_WORD = 32 // BITS  # values per int32
SCALE_DTYPE = torch.bfloat16
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)  # bit offset of element i in its word


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., in] -> [..., in/group_size, group_size]."""
    if w.shape[-1] % group_size:
        raise ValueError(f"input dimension {w.shape[-1]} is not a multiple of the group size {group_size}")
    return w.unflatten(-1, (w.shape[-1] // group_size, group_size))


def compute_scale(w: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """Per-group scale max|w| / 7.5 in bf16: [..., in] -> [..., in/group_size].

    The division runs in w's dtype (as compressed-tensors does), so bf16 weights give its exact scales.
    """
    amax = _groups(w.detach(), group_size).abs().amax(-1)
    scale = amax / torch.tensor((QMAX - QMIN) / 2, dtype=w.dtype)
    scale = scale.to(SCALE_DTYPE)
    # An all-zero group would divide by zero; compressed-tensors stores the dtype's eps there instead.
    return torch.where(scale == 0, torch.finfo(SCALE_DTYPE).eps, scale)


def quantize(w: torch.Tensor, scale: torch.Tensor | None = None, group_size: int = GROUP_SIZE
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., in] -> (q int8 [..., in] in [-8, 7], scale bf16 [..., in/group_size])."""
    if scale is None:
        scale = compute_scale(w, group_size)
    s = scale.to(w.dtype).unsqueeze(-1)
    q = torch.round(torch.clamp(_groups(w.detach(), group_size) / s, QMIN, QMAX))
    return q.flatten(-2).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [..., in], scale [..., in/g]) -> w [..., in] = q * scale per group, in `dtype`.

    The product is exact in fp32 (4-bit times 8-bit mantissas), so casting it to bf16 equals
    compressed-tensors' bf16 dequantization.
    """
    group_size = q.shape[-1] // scale.shape[-1]
    w = _groups(q.to(torch.float32), group_size) * scale.to(torch.float32).unsqueeze(-1)
    return w.flatten(-2).to(dtype)


class _FakeQuant(torch.autograd.Function):
    """Quantize-dequantize forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, group_size: int) -> torch.Tensor:
        q, scale = quantize(w, group_size=group_size)
        return dequantize(q, scale, w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quantize(w: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """The weight the INT4 model will see, with gradients passed straight through to w (QAT)."""
    return _FakeQuant.apply(w, group_size)


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., in] in [-8, 7] -> int32 [..., in/8]: element i of a word at bits 4i, stored as q + 8."""
    if q.dtype != torch.int8:
        raise ValueError(f"pack expects int8 values, got {q.dtype}")
    if q.shape[-1] % PER_WORD:
        raise ValueError(f"input dimension {q.shape[-1]} is not a multiple of {PER_WORD}")
    u = (q.to(torch.int32) - QMIN).unflatten(-1, (q.shape[-1] // PER_WORD, PER_WORD))
    # Fields do not overlap, so OR-ing the shifted values builds the word; the top field wraps the sign bit.
    packed = torch.zeros(u.shape[:-1], dtype=torch.int32)
    for i in range(PER_WORD):
        packed |= u[..., i] << (BITS * i)
    return packed


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., in/8] -> int8 [..., in] in [-8, 7] (the inverse of `pack`)."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {packed.dtype}")
    u = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & (2 ** BITS - 1)
    return (u.flatten(-2) + QMIN).to(torch.int8)
