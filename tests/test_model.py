"""The model's own contracts: absorbed decode == full path, routing, caches with slots, generation."""

import dataclasses

import pytest
import torch

from k2lab.config import ModelConfig
from k2lab.model import K2ForCausalLM, parameter_counts, sample
from tests.conftest import random_model, tiny_config


def test_absorbed_decode_equals_full_path_for_256_steps():
    model = random_model(tiny_config())
    steps, prompt_len = 256, 5
    ids = torch.randint(0, 512, (2, prompt_len + steps), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)  # [2, T, V]: the full (training) path over the whole sequence
        cache = model.new_cache(2, prompt_len + steps)
        pos = torch.arange(prompt_len + steps)[None].expand(2, -1)
        model(ids[:, :prompt_len], positions=pos[:, :prompt_len], cache=cache)
        worst = 0.0
        for t in range(prompt_len, prompt_len + steps):
            assert 1 < model.model.layers[0].self_attn.absorb_below  # one token: the absorbed path
            step = model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache)[:, 0]
            worst = max(worst, (step - full[:, t]).abs().max().item())
    assert worst <= 1e-4


def test_chunked_prefill_and_cache_slots_match_full_path():
    model = random_model(tiny_config())
    ids = torch.randint(0, 512, (3, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(5, 64)
        rows = torch.tensor([4, 0, 2])  # arbitrary slots, as a serving engine uses them
        pos = torch.arange(40)[None].expand(3, -1)
        outs = [model(ids[:, a:b], positions=pos[:, a:b], cache=cache, rows=rows) for a, b in
                [(0, 17), (17, 33), (33, 40)]]
    assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-4


def test_rows_at_different_positions_in_one_batch():
    """Two sequences of different lengths decode together; each equals its own full-path logits."""
    model = random_model(tiny_config())
    a, b = torch.randint(0, 512, (1, 12)), torch.randint(0, 512, (1, 5))
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        model(a[:, :11], positions=torch.arange(11)[None], cache=cache, rows=torch.tensor([0]))
        model(b[:, :4], positions=torch.arange(4)[None], cache=cache, rows=torch.tensor([1]))
        step = model(torch.cat([a[:, 11:], b[:, 4:]]), positions=torch.tensor([[11], [4]]), cache=cache)
        assert (step[0, 0] - model(a)[0, -1]).abs().max() <= 1e-4
        assert (step[1, 0] - model(b)[0, -1]).abs().max() <= 1e-4


def test_router_group_limited_choice_and_weights():
    config = tiny_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    router = random_model(config).model.layers[1].mlp.gate
    x = torch.randn(50, config.hidden_size)
    idx, w = router(x)
    scores = (x @ router.weight.T).sigmoid()
    choice = scores + router.e_score_correction_bias
    group_best = choice.view(50, 4, 2).topk(2, -1).values.sum(-1)
    kept = group_best.topk(2, -1).indices
    for row in range(50):
        groups = set((idx[row] // 2).tolist())
        assert groups <= set(kept[row].tolist())  # experts only from the kept groups
        assert len(set(idx[row].tolist())) == 3
    torch.testing.assert_close(w.sum(-1), torch.full((50,), config.routed_scaling_factor))
    expected = scores.gather(1, idx)  # unbiased scores, normalized, times the scaling factor
    torch.testing.assert_close(w, expected / expected.sum(-1, keepdim=True) * config.routed_scaling_factor)


def test_experts_sorted_compute_equals_per_token_loop():
    moe = random_model(tiny_config()).model.layers[1].mlp
    x = torch.randn(30, moe.gate.weight.shape[1])
    idx, w = moe.gate(x)
    out = moe.experts(x, idx, w)
    ex = moe.experts
    ref = torch.zeros_like(x)
    for n in range(30):
        for j in range(idx.shape[1]):
            e = idx[n, j]
            h = torch.nn.functional.silu(ex.gate_proj[e] @ x[n]) * (ex.up_proj[e] @ x[n])
            ref[n] += w[n, j] * (ex.down_proj[e] @ h)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_last_load_counts_the_tokens_routed_to_each_expert_in_the_last_forward():
    """The balancer's input, against a per-token transcription of noaux_tc (REFERENCE.md §3): choose by sigmoid
    score + bias among the topk_group groups whose two best experts score highest."""
    config = tiny_config()
    moe = random_model(config).model.layers[1].mlp
    group_size = config.n_routed_experts // config.n_group
    for tokens in (13, 40):  # each forward replaces the previous count
        x = torch.randn(1, tokens, config.hidden_size)
        with torch.no_grad():
            moe(x)
        expected = [0] * config.n_routed_experts
        for row in x[0]:
            choice = ((moe.gate.weight @ row).sigmoid() + moe.gate.e_score_correction_bias).tolist()
            groups = sorted(range(config.n_group), reverse=True, key=lambda g: sum(
                sorted(choice[g * group_size:(g + 1) * group_size], reverse=True)[:2]))[:config.topk_group]
            allowed = [e for e in range(config.n_routed_experts) if e // group_size in groups]
            for e in sorted(allowed, key=lambda e: choice[e], reverse=True)[:config.num_experts_per_tok]:
                expected[e] += 1
        assert moe.last_load.tolist() == expected
        assert sum(expected) == tokens * config.num_experts_per_tok


def test_backward_reaches_every_parameter():
    model = random_model(tiny_config()).train()
    ids = torch.randint(0, 512, (4, 33))
    logits = model(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, 512), ids[:, 1:].reshape(-1)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_generate_is_reproducible_and_respects_seed():
    model = random_model(tiny_config())
    prompt = torch.randint(0, 512, (2, 6))
    a = model.generate(prompt, 20, temperature=1.0, top_p=0.9, seed=7)
    b = model.generate(prompt, 20, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(a, b) and a.shape == (2, 26) and torch.equal(a[:, :6], prompt)
    greedy = model.generate(prompt, 20)
    assert torch.equal(greedy, model.generate(prompt, 20))


def test_generate_stops_rows_at_eos():
    model = random_model(tiny_config())
    first = model.generate(torch.tensor([[1, 2, 3]]), 1)[0, -1].item()
    out = model.generate(torch.tensor([[1, 2, 3]]), 10, eos_token_id=first)
    assert out.shape == (1, 4) and out[0, -1] == first


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, 0.8, uniform=torch.rand(1, generator=gen))[0].item() for _ in range(200)}
    assert draws == {0, 1}


def test_position_beyond_cache_is_an_error():
    model = random_model(tiny_config())
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="beyond the cache"):
        model(torch.tensor([[1]]), positions=torch.tensor([[4]]), cache=cache)


def test_full_size_model_builds_on_meta():
    with torch.device("meta"):
        model = K2ForCausalLM(ModelConfig.preset("kimi-k2.6"))
    counts = parameter_counts(model)  # REFERENCE §1, routing biases included
    assert counts["total"] == 1_026_408_232_448 and counts["active"] == 32_861_500_928


def test_config_rejects_inconsistent_routing():
    with pytest.raises(ValueError, match="n_group"):
        dataclasses.replace(tiny_config(), n_group=3)
