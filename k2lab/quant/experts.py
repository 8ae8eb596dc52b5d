"""INT4 routed experts: SwiGLU experts that compute straight from 4-bit weights (W4A16).

Each projection of each expert stays packed in memory: 4 bits per weight in the layout of torch's CPU
INT4 matmul (`aten._weight_int4pack_mm_for_cpu`, which unpacks and scales each group inside its AVX512 /
AVX2 micro-kernel) plus one bf16 scale per 32 weights, so 4.5 bits per weight. The kernel also takes a
zero point per group; the scheme is symmetric, so the zeros are made per call for the active expert only
instead of doubling the resident scale bytes. Activations go to the kernel in bf16 (its fast path) and
come back in the caller's dtype.

The released (compressed-tensors) layout is the interface: `from_compressed` builds the module from
per-expert `weight_packed` / `weight_scale`, and `compressed` gives them back bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2lab.model import Experts
from k2lab.quant import int4

PROJS = ("gate_proj", "up_proj", "down_proj")
_ACT_DTYPE = torch.bfloat16


def _prepack(q: torch.Tensor) -> torch.Tensor:
    """int8 q [N, K] in [-8, 7] -> torch's CPU INT4 layout (uint8, opaque, N*K/2 bytes).

    The kernel needs N divisible by 16; every expert shape the format admits has N a multiple of the group size.
    """
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) - int4.QMIN, 1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    b = packed.reshape(-1).to(torch.int64)
    return torch.stack((b & 15, b >> 4), -1).reshape(-1)


def _prepack_permutation(n: int, k: int) -> torch.Tensor:
    """Position j of the prepacked nibbles holds weight perm[j] (flat index into [N, K]).

    The kernel's layout depends on the CPU (AVX512, AVX2 or scalar blocks), so rather than restating it we
    read it off the kernel: pack the flat index one hex digit at a time and see where each digit lands.
    """
    index = torch.arange(n * k, dtype=torch.int64)
    perm = torch.zeros(n * k, dtype=torch.int64)
    for d in range(max(1, ((n * k - 1).bit_length() + 3) // 4)):
        digit = ((index >> (4 * d)) & 15).view(n, k).to(torch.int8) + int4.QMIN
        perm |= _nibbles(_prepack(digit)) << (4 * d)
    return perm


def _unprepack(packed: torch.Tensor, n: int, k: int, perm: torch.Tensor) -> torch.Tensor:
    q = torch.empty(n * k, dtype=torch.int64)
    q[perm] = _nibbles(packed)
    return (q + int4.QMIN).to(torch.int8).view(n, k)


class Int4Experts(nn.Module):
    """Routed experts with the forward of `Experts`, computing from packed INT4 weights.

    Buffers per projection P: `P_packed` uint8 [E, N*K/2] (kernel layout) and `P_scale` bf16 [E, K/g, N]
    (the kernel wants scales input-group-major), where N = out_features, K = in_features, g = group size.
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, group_size: int = int4.GROUP_SIZE):
        super().__init__()
        if hidden_size % group_size or intermediate_size % group_size:
            raise ValueError(f"expert dimensions {hidden_size} and {intermediate_size} must be multiples of the "
                             f"group size {group_size}")
        self.n_experts, self.group_size = n_experts, group_size
        self.shapes = {"gate_proj": (intermediate_size, hidden_size), "up_proj": (intermediate_size, hidden_size),
                       "down_proj": (hidden_size, intermediate_size)}
        for p, (n, k) in self.shapes.items():
            self.register_buffer(f"{p}_packed", torch.zeros(n_experts, n * k // 2, dtype=torch.uint8))
            self.register_buffer(f"{p}_scale", torch.zeros(n_experts, k // group_size, n, dtype=int4.SCALE_DTYPE))

    # ---- construction and export in the released layout ----------------------------------------------------
    @classmethod
    def from_compressed(cls, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> "Int4Experts":
        """tensors[P] = (weight_packed int32 [E, N, K/8], weight_scale [E, N, K/g]) for P in PROJS."""
        gate_packed, gate_scale = tensors["gate_proj"]  # [E, I, D/8], [E, I, D/g]
        e, inter, hidden = gate_packed.shape[0], gate_packed.shape[1], gate_packed.shape[2] * int4.PER_WORD
        m = cls(e, hidden, inter, hidden // gate_scale.shape[2])
        for p in PROJS:
            packed, scale = tensors[p]
            n, k = m.shapes[p]
            if packed.shape != (e, n, k // int4.PER_WORD) or scale.shape != (e, n, k // m.group_size):
                raise ValueError(f"{p}: packed {tuple(packed.shape)} / scale {tuple(scale.shape)} do not match "
                                 f"{e} experts of [{n}, {k}] with group size {m.group_size}")
            for x in range(e):
                getattr(m, f"{p}_packed")[x] = _prepack(int4.unpack(packed[x])).reshape(-1)
            getattr(m, f"{p}_scale").copy_(scale.to(int4.SCALE_DTYPE).transpose(1, 2))
        return m

    @classmethod
    def from_weights(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> "Int4Experts":
        """Post-training quantization of full-precision 3-D expert weights [E, N, K]."""
        tensors = {}
        for p, w in zip(PROJS, (gate, up, down)):
            q, scale = int4.quantize(w)
            tensors[p] = (int4.pack(q), scale)
        return cls.from_compressed(tensors)

    def compressed(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The inverse of `from_compressed`: P -> (weight_packed int32 [E, N, K/8], weight_scale bf16 [E, N, K/g])."""
        out = {}
        for p, (n, k) in self.shapes.items():
            perm = _prepack_permutation(n, k)
            packed = getattr(self, f"{p}_packed")
            q = torch.stack([_unprepack(packed[x], n, k, perm) for x in range(self.n_experts)])
            out[p] = (int4.pack(q), getattr(self, f"{p}_scale").transpose(1, 2).contiguous())
        return out

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full-precision (gate, up, down) [E, N, K], the weights this module computes with."""
        return tuple(int4.dequantize(int4.unpack(packed), scale) for packed, scale in self.compressed().values())

    # ---- compute ----------------------------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, p: str, e: int) -> torch.Tensor:
        """x [n, K] bf16 -> x @ W_e^T [n, N] bf16 for projection p of expert e."""
        scale = getattr(self, f"{p}_scale")[e]
        scale_and_zeros = torch.stack((scale, torch.zeros_like(scale)), -1)  # [K/g, N, 2]; symmetric: zero = 0
        packed = getattr(self, f"{p}_packed")[e].view(self.shapes[p][0], -1)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group_size, scale_and_zeros)

    def grouped_ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [M, D] sorted by expert with counts [E] rows each -> the experts' outputs [M, D] (xs's dtype)."""
        x16, outs, start = xs.to(_ACT_DTYPE), [], 0
        for e, n in enumerate(counts.tolist()):  # one kernel call per projection of each active expert
            if n:
                xe = x16[start:start + n]
                h = F.silu(self._linear(xe, "gate_proj", e)) * self._linear(xe, "up_proj", e)
                outs.append(self._linear(h, "down_proj", e))
                start += n
        return torch.cat(outs).to(xs.dtype) if outs else xs.new_zeros(0, xs.shape[1])

    # The routing dispatch (sort tokens by expert, weight, scatter back) is exactly the full-precision one.
    forward = Experts.forward

    def weight_bytes(self) -> int:
        """Bytes the expert weights occupy in memory (packed values and scales)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())
