"""The INT4 scheme: pack/unpack, quantize/dequantize error, fake quantization, INT4 expert compute.

References: compressed-tensors' own qparams / fake_quantize / pack_to_int32 (bf16 weights, as released), and a
numpy transcription of the scheme (REFERENCE.md §8: scale = max|w| / 7.5 stored in bf16, q = round-half-even of
w / scale clamped to [-8, 7], w ~ q * scale) for float32 weights, where compressed-tensors keeps a float32 scale.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from hypothesis import given, settings
from hypothesis import strategies as st

from k2lab.quant import int4
from k2lab.quant.experts import Int4Experts

shapes = st.tuples(st.integers(1, 5), st.integers(1, 6))  # rows, in/32
CT_ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)


def np_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 (ties to even), returned as float32: keep the top 16 bits after rounding."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def np_fake_quantize(w: np.ndarray) -> np.ndarray:
    """REFERENCE.md §8 on float32 numpy arrays [..., in]: what the INT4 model computes with."""
    g = w.astype(np.float32).reshape(*w.shape[:-1], -1, 32)
    scale = np_bf16(np.abs(g).max(-1) / np.float32(7.5))
    scale[scale == 0] = np.float32(2.0**-7)  # an all-zero group stores bf16's eps, as compressed-tensors does
    q = np.clip(np.rint(g / scale[..., None]), -8, 7)  # np.rint rounds half to even
    return (q * scale[..., None]).reshape(w.shape).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), extremes=st.booleans())
def test_pack_unpack_round_trip(shape, seed, extremes):
    rows, groups = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, groups * 32), generator=g, dtype=torch.int8)
    if extremes:  # the corners of the range, where the +8 offset and the sign bit of the top field matter
        q[:, ::2], q[:, 1::2] = -8, 7
    packed = int4.pack(q)
    assert packed.dtype == torch.int32 and packed.shape == (rows, groups * 4)
    assert torch.equal(packed, pack_to_int32(q, 4))  # compressed-tensors' packing: the same bits
    assert torch.equal(int4.unpack(packed), q)


def test_pack_bit_layout():
    q = torch.tensor([[-8, 7, 0, 1, -1, 2, -2, 3]], dtype=torch.int8)
    stored = [v + 8 for v in q[0].tolist()]
    word = sum(v << (4 * i) for i, v in enumerate(stored))  # element i at bits 4i
    assert int4.pack(q).item() == word - (1 << 32 if word >= 1 << 31 else 0)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-12, 4), zero_group=st.booleans())
def test_quantize_error_within_half_step(shape, seed, log_scale, zero_group):
    rows, groups = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * 32, generator=g) * 2.0 ** log_scale
    if zero_group:
        w[0, :32] = 0
    q, scale = int4.quantize(w)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    assert scale.dtype == torch.bfloat16 and scale.shape == (rows, groups)
    err = (int4.dequantize(q, scale) - w).abs().unflatten(-1, (groups, 32))
    s = scale.float()
    # Half a step, plus what rounding the scale to bf16 costs at the clamped top of the range.
    amax = w.abs().unflatten(-1, (groups, 32)).amax(-1)
    bound = 0.5 * s + (amax - 7.5 * s).clamp(min=0)
    assert (err <= bound.unsqueeze(-1) * (1 + 1e-6)).all()
    assert (bound <= (0.5 + 7.5 * 2**-8) * s).all()  # bf16 rounds the scale by at most 2^-8


def test_quantize_hits_both_extremes():
    w = torch.tensor([[-7.5] + [0.1] * 30 + [7.5]])  # scale exactly 1.0 in bf16
    q, scale = int4.quantize(w)
    assert scale.item() == 1.0 and q[0, 0].item() == -8 and q[0, -1].item() == 7  # -7.5 rounds to even


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-8, 3))
def test_fake_quantize_equals_compressed_tensors_on_bf16(shape, seed, log_scale):
    rows, groups = shape
    w = (torch.randn(rows, groups * 32, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale).bfloat16()
    g = w.unflatten(-1, (groups, 32))
    scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), CT_ARGS)
    assert torch.equal(int4.fake_quantize(w), ct_fake_quantize(w, scale, zero, CT_ARGS))


def test_fake_quantize_equals_the_scheme_on_float32():
    torch.manual_seed(0)
    w = torch.randn(5, 128) * 0.05
    w[1, 32:64] = 0  # an all-zero group
    w[2, :32] = torch.linspace(-7.5, 7.5, 32)  # scale exactly 1: every level, halves rounding to even
    expected = torch.from_numpy(np_fake_quantize(w.numpy()))
    assert torch.equal(int4.fake_quantize(w), expected)
    assert torch.equal(expected[2, :4], torch.tensor([-8.0, -7.0, -7.0, -6.0]))  # -7.5 -> -8, -7.016 -> -7, ...


def test_fake_quantize_passes_gradients_straight_through():
    w = torch.randn(4, 64, requires_grad=True)
    grad = torch.randn(4, 64)
    int4.fake_quantize(w).backward(grad)
    assert torch.equal(w.grad, grad)


def _reference_experts(x, idx, weight, gate, up, down):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            h = F.silu(x[t] @ gate[e].T) * (x[t] @ up[e].T)
            out[t] += weight[t, j] * (h @ down[e].T)
    return out


@pytest.mark.parametrize("n_tokens", [1, 7])
def test_int4_experts_match_dequantized_weights(n_tokens):
    torch.manual_seed(0)
    e, d, i, k = 6, 64, 32, 2
    gate, up = torch.randn(e, i, d) * 0.1, torch.randn(e, i, d) * 0.1
    down = torch.randn(e, d, i) * 0.1
    m = Int4Experts.from_weights(gate, up, down)
    x = torch.randn(n_tokens, d)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n_tokens)])
    weight = torch.rand(n_tokens, k)
    dq = [torch.from_numpy(np_fake_quantize(w.numpy())) for w in (gate, up, down)]
    for a, b in zip(m.dequantized(), dq):
        assert torch.equal(a, b)
    ref = _reference_experts(x, idx, weight, *dq)
    y = m(x, idx, weight)
    assert y.dtype == x.dtype
    # W4A16: activations pass through bf16, so agreement is to bf16 precision.
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_int4_experts_compressed_round_trip_and_bytes():
    torch.manual_seed(1)
    e, d, i = 3, 96, 64
    q = {p: torch.randint(-8, 8, (e, *s), dtype=torch.int8)
         for p, s in {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}.items()}
    tensors = {p: (int4.pack(v), (torch.rand(e, v.shape[1], v.shape[2] // 32) + 0.01).to(torch.bfloat16))
               for p, v in q.items()}
    m = Int4Experts.from_compressed(tensors)
    back = m.compressed()
    for p in tensors:
        assert torch.equal(back[p][0], tensors[p][0]) and torch.equal(back[p][1], tensors[p][1])
    n_weights = 3 * e * d * i
    assert m.weight_bytes() * 8 / n_weights == 4.5


def test_int4_experts_reject_dimensions_off_the_group_grid():
    with pytest.raises(ValueError, match="multiples of the group size"):
        Int4Experts(2, 96, 48)
