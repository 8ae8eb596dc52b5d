"""The in-process rollout API on a random tiny model: log-probabilities against a full forward pass, greedy
rollouts against `generate`, K distinct samples, finish reasons, seeds, and in-place weight updates."""

import pytest
import torch

from k2lab.model.multimodal import K2VLForConditionalGeneration, multimodal_config
from k2lab.model.vision import VisionConfig
from k2lab.serve.engine import Engine
from k2lab.serve.rollout import InProcessGenerator, RolloutParams
from k2lab.serve.sampling import SamplingParams
from tests.conftest import random_model, randomize_, tiny_config

EOS = 257


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=2)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def full_forward_logits(model, sample):
    """Next-token logits [len(completion), V] at the completion's positions, from one causal pass (no cache)."""
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
    with torch.no_grad():
        return model(ids)[0, len(sample.prompt_ids) - 1:-1].float()


def test_logprobs_equal_a_full_forward_pass(model):
    """At temperature 1 the returned log-probs are log_softmax of the model's logits at each sampled position;
    the K-1 samples that decode from a copied prompt cache are checked like the first."""
    out = InProcessGenerator(model).generate(prompts(3), k=3, params=RolloutParams(max_new_tokens=16, seed=1))
    assert len(out) == 9 and [(s.prompt_index, s.sample_index) for s in out[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    for s in out:
        ref = full_forward_logits(model, s).log_softmax(-1)
        got = torch.tensor(s.logprobs)
        assert len(s.completion_ids) == 16 and s.finish_reason == "length"
        assert (got - ref[torch.arange(16), s.completion_ids]).abs().max() <= 1e-4


def test_logprobs_are_those_of_the_distribution_sampled_from(model):
    """At temperature 0.7 with top-k 20, a log-prob is that of softmax(logits / 0.7) renormalized over the top 20,
    and every sampled token is among them."""
    params = RolloutParams(max_new_tokens=10, temperature=0.7, top_k=20, seed=3)
    for s in InProcessGenerator(model).generate(prompts(2, seed=4), k=2, params=params):
        z = full_forward_logits(model, s) / 0.7
        kth = z.topk(20).values[:, -1:]
        ref = z.masked_fill(z < kth, float("-inf")).log_softmax(-1)[torch.arange(10), s.completion_ids]
        assert torch.isfinite(ref).all() and (torch.tensor(s.logprobs) - ref).abs().max() <= 1e-4


def test_greedy_rollouts_equal_generate(model):
    ps = prompts(4, seed=5)
    out = InProcessGenerator(model).generate(ps, k=2, params=RolloutParams(max_new_tokens=20, temperature=0.0))
    for s in out:
        ref = model.generate(torch.tensor([s.prompt_ids]), max_new_tokens=20)[0, len(s.prompt_ids):].tolist()
        assert s.completion_ids == ref and s.logprobs == [0.0] * 20


def test_k_samples_differ_and_seeds_reproduce(model):
    gen = InProcessGenerator(model)
    p = prompts(2, seed=6)
    a = gen.generate(p, k=4, params=RolloutParams(max_new_tokens=12, seed=7))
    assert len({tuple(s.completion_ids) for s in a[:4]}) == 4
    assert gen.generate(p, k=4, params=RolloutParams(max_new_tokens=12, seed=7)) == a
    b = gen.generate(p, k=4, params=RolloutParams(max_new_tokens=12, seed=8))
    assert [s.completion_ids for s in b] != [s.completion_ids for s in a]


def test_finish_reasons(model):
    ps = prompts(3, seed=8)
    greedy = RolloutParams(max_new_tokens=15, temperature=0.0)
    free = InProcessGenerator(model).generate(ps, params=greedy)
    stop_id = free[0].completion_ids[4]
    cut = free[0].completion_ids.index(stop_id) + 1
    for gen, params in [(InProcessGenerator(model, eos_ids=(stop_id,)), greedy),
                        (InProcessGenerator(model), RolloutParams(max_new_tokens=15, temperature=0.0,
                                                                  stop_token_ids=(stop_id,)))]:
        out = gen.generate(ps, params=params)
        assert out[0].completion_ids == free[0].completion_ids[:cut] and out[0].finish_reason == "stop"
        assert len(out[0].logprobs) == cut
        for s, f in zip(out[1:], free[1:]):  # the others stop at the id too, or run to the length limit
            if stop_id in f.completion_ids:
                assert s.finish_reason == "stop" and s.completion_ids[-1] == stop_id
            else:
                assert s.finish_reason == "length" and s.completion_ids == f.completion_ids


def test_in_place_weight_update_is_seen_by_the_next_call():
    model = random_model(tiny_config(), seed=3)
    gen = InProcessGenerator(model, eos_ids=(EOS,))
    ps = prompts(2, seed=9)
    params = RolloutParams(max_new_tokens=12, temperature=0.0)
    before = gen.generate(ps, params=params)
    with torch.no_grad():  # what an optimizer step does: change the parameters' storage in place
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    gen.policy_version += 1
    after = gen.generate(ps, params=params)
    assert [s.policy_version for s in before] == [0, 0] and [s.policy_version for s in after] == [1, 1]
    assert [s.completion_ids for s in after] != [s.completion_ids for s in before]
    for s in after:
        ref = model.generate(torch.tensor([s.prompt_ids]), 12, eos_token_id=EOS)[0, len(s.prompt_ids):].tolist()
        assert s.completion_ids == ref[:len(s.completion_ids)]


def test_the_multimodal_model_offers_the_same_interface():
    """The engine and the rollout API take the K2.6 multimodal model as they take the text model (embed, forward
    with cache slots, new_cache): text prompts give the tokens of the model's own generate."""
    torch.manual_seed(0)
    model = K2VLForConditionalGeneration(multimodal_config(tiny_config(), VisionConfig.preset("tiny")))
    randomize_(model, 0)
    model.eval()
    ps = prompts(2, seed=10)
    out = InProcessGenerator(model).generate(ps, params=RolloutParams(max_new_tokens=8, temperature=0.0))
    engine = Engine(model, lambda t: bytes([t % 256]), (EOS,), max_len=64, max_slots=2)
    for p, s in zip(ps, out):
        ref = model.generate(torch.tensor([p]), max_new_tokens=8)[0, len(p):].tolist()
        assert s.completion_ids == ref
        served = engine.generate(p, SamplingParams(max_tokens=8, temperature=0.0)).output
        assert served == ref[:len(served)]


def test_bad_input_is_refused_with_a_message(model):
    gen = InProcessGenerator(model)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([[1, 2], []])
    with pytest.raises(ValueError, match="exceeds the model's 1024 positions"):
        gen.generate([[1] * 1000], params=RolloutParams(max_new_tokens=100))
    with pytest.raises(ValueError, match="outside"):
        gen.generate([[1, 512]])
    with pytest.raises(ValueError, match="top_p"):
        RolloutParams(top_p=0.0)
