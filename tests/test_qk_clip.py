"""QK-Clip on a hand-built MLA-shaped layer: clipped heads' max logit becomes tau, everything else unchanged."""

import torch
from torch import nn

from k2lab.optim.qk_clip import qk_clip_


class HandMLA(nn.Module):
    """The MLA projections with MODEL_API names and row layouts, and a plain reference score computation.

    This is a hand-built double of the attention (the thing under test is qk_clip_, not the model): q rows per
    head are q_nope then q_rope; kv_b rows per head are k_nope then v; k_rope is one shared head from kv_a.
    """

    def __init__(self, H=4, nope=8, rope=4, v=6, q_lora=12, kv_lora=10, dim=16):
        super().__init__()
        self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = H, nope, rope, v
        self.softmax_scale = (nope + rope) ** -0.5
        self.q_b_proj = nn.Linear(q_lora, H * (nope + rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, kv_lora + rope, bias=False)
        self.kv_b_proj = nn.Linear(kv_lora, H * (nope + v), bias=False)
        self.track_max_logits = True
        self.max_logits = None

    def forward(self, c_q, x):
        """c_q [T, q_lora], x [T, dim] -> (logits [H, T, T] causal-masked, v [T, H, v])."""
        H, nope, rope = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        T = x.shape[0]
        q = self.q_b_proj(c_q).view(T, H, nope + rope)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_b_proj.in_features, rope], -1)
        kv = self.kv_b_proj(c_kv).view(T, H, nope + self.v_head_dim)
        k_nope, v = kv.split([nope, self.v_head_dim], -1)
        k = torch.cat([k_nope, k_rope[:, None].expand(T, H, rope)], -1)
        logits = torch.einsum("thd,shd->hts", q, k) * self.softmax_scale
        logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        self.max_logits = logits.flatten(1).amax(1).detach()
        return logits, v


def test_clipped_heads_reach_tau_others_unchanged():
    torch.manual_seed(0)
    mla = HandMLA()
    with torch.no_grad():  # make heads 0 and 2 hot
        mla.q_b_proj.weight.view(4, 12, 12)[[0, 2]] *= 8
    c_q, x = torch.randn(9, 12), torch.randn(9, 16)
    logits, v = mla(c_q, x)
    tau = float(logits.detach().flatten(1).amax(1)[[1, 3]].max()) + 1.0  # between the cool and the hot heads
    before = logits.detach().flatten(1).amax(1)
    assert (before[[0, 2]] > tau).all() and (before[[1, 3]] < tau).all()
    kv_a = mla.kv_a_proj_with_mqa.weight.clone()

    stats = qk_clip_(mla, tau=tau)
    after_logits, after_v = mla(c_q, x)
    after = after_logits.flatten(1).amax(1)
    torch.testing.assert_close(after[[0, 2]], torch.full((2,), tau), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(after_logits[[1, 3]], logits[[1, 3]])  # unclipped heads: identical scores
    torch.testing.assert_close(after_v, v)  # v rows untouched
    assert torch.equal(mla.kv_a_proj_with_mqa.weight, kv_a)  # shared k_rope untouched
    assert stats == [{"max_logit": float(before.max()), "heads_clipped": 2}]
    # The whole score matrix of a clipped head scales by gamma (both nope and rope parts).
    gamma = tau / before[0]
    finite = torch.isfinite(logits[0])
    torch.testing.assert_close(after_logits[0][finite], logits[0][finite] * gamma, rtol=1e-5, atol=1e-5)


def test_nothing_changes_below_tau():
    torch.manual_seed(1)
    mla = HandMLA()
    mla(torch.randn(5, 12), torch.randn(5, 16))
    w = [p.clone() for p in mla.parameters()]
    assert qk_clip_(mla, tau=1e6)[0]["heads_clipped"] == 0
    assert all(torch.equal(a, b) for a, b in zip(w, mla.parameters()))


def test_missing_record_is_a_clear_error():
    import pytest
    with pytest.raises(RuntimeError, match="recorded no max_logits"):
        qk_clip_(HandMLA(), tau=1.0)


def test_real_mla_clipped_head_max_logit_equals_tau():
    """End to end on the model's MLA (k2lab.model): record S_max in the forward, clip, forward again."""
    from k2lab.model import K2ForCausalLM
    from k2lab.optim.qk_clip import mla_layers, track_max_logits
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = K2ForCausalLM(tiny_config()).train()
    attn = mla_layers(model)[1]
    H, nope, rope = attn.n_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    with torch.no_grad():  # heads 0 and 3 of layer 1 produce large logits
        attn.q_b_proj.weight.view(H, nope + rope, -1)[[0, 3]] *= 30
    track_max_logits(model)
    ids = torch.randint(0, 500, (2, 24))
    model(ids)
    before = [m.max_logits.clone() for m in mla_layers(model)]
    tau = float(before[1][[1, 2]].max()) * 2
    assert (before[1][[0, 3]] > tau).all() and all((b <= tau).all() for i, b in enumerate(before) if i != 1)
    v_rows = attn.kv_b_proj.weight.view(H, -1, attn.kv_b_proj.in_features)[:, nope:].clone()
    k_rope = attn.kv_a_proj_with_mqa.weight.clone()

    stats = qk_clip_(model, tau=tau)
    assert [s["heads_clipped"] for s in stats] == [0, 2, 0]
    model(ids)
    after = [m.max_logits for m in mla_layers(model)]
    # Layer 1's input is unchanged (layer 0 untouched), so its clipped heads now peak exactly at tau.
    torch.testing.assert_close(after[1][[0, 3]], torch.full((2,), tau), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[1][[1, 2]], before[1][[1, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert torch.equal(attn.kv_b_proj.weight.view(H, -1, attn.kv_b_proj.in_features)[:, nope:], v_rows)
    assert torch.equal(attn.kv_a_proj_with_mqa.weight, k_rope)
