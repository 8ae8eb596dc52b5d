"""The engine on a random tiny model: batching never changes a request's tokens, sampling options, streaming,
stop handling, logprobs, cancellation and the memory budget. Tokens map to bytes by a simple test vocabulary
(ids < 256 are single bytes), since the engine itself only sees token ids."""

import math
import threading
import time

import pytest
import torch

from k2lab.serve.engine import Engine, EngineError
from k2lab.model import sample
from k2lab.serve.sampling import SamplingParams
from tests.conftest import random_model, tiny_config

EOS = 257


def token_bytes(t: int) -> bytes:
    return bytes([t]) if t < 256 else f"<|{t}|>".encode()


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=1)


def make_engine(model, **kw):
    kw = {"max_len": 128, "max_slots": 16, "prefill_chunk": 64, **kw}
    return Engine(model, token_bytes, (EOS,), **kw)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def greedy(n=12):
    return SamplingParams(max_tokens=n, temperature=0.0)


def test_greedy_matches_model_generate(model):
    engine = make_engine(model)
    for p in prompts(3):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12)[0, len(p):].tolist()
        assert engine.generate(p, SamplingParams(max_tokens=12, temperature=0.0)).output[:len(ref)] == ref


def test_batching_does_not_change_outputs(model):
    """Greedy and seeded requests give the same tokens alone and inside a busy batch with staggered arrivals,
    chunked prefill and more requests than slots."""
    ps = prompts(14, seed=3)
    params = [greedy(10) if i % 2 else SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=i)
              for i in range(len(ps))]
    alone = [make_engine(model).generate(p, sp).output for p, sp in zip(ps, params)]
    engine = make_engine(model, max_slots=6, prefill_chunk=16)
    reqs = []
    for i, (p, sp) in enumerate(zip(ps, params)):
        reqs.append(engine.submit(p, sp))
        if i % 3 == 2:
            engine.step()
    while any(not r.done.is_set() for r in reqs):
        engine.step()
    assert [r.output for r in reqs] == alone
    assert engine.free and len(engine.free) == engine.slots


def test_chunked_prefill_equals_whole_prefill(model):
    p = prompts(1, seed=5)[0] * 3
    whole = make_engine(model, prefill_chunk=1000).generate(p, greedy()).output
    assert make_engine(model, prefill_chunk=7).generate(p, greedy()).output == whole


def test_stream_text_stop_strings_and_stop_ids(model):
    engine = make_engine(model)
    p = prompts(1, seed=7)[0]
    events = []
    req = engine.submit(p, greedy(20), events.append)
    while not req.done.is_set():
        engine.step()
    full = b"".join(token_bytes(t) for t in req.output).decode("utf-8", errors="replace")
    assert "".join(e.text for e in events) == req.text == full
    assert events[-1].finish_reason == "length" and len(req.output) == 20
    # a stop string taken from the middle of the output: text is cut before it, streamed text matches
    stop = full[8:11]
    events = []
    r2 = engine.submit(p, SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,)), events.append)
    while not r2.done.is_set():
        engine.step()
    assert r2.finish_reason == "stop" and r2.text == full[:full.find(stop)]
    assert "".join(e.text for e in events) == r2.text
    # a stop token id ends generation at its first occurrence and adds no text
    stop_id = req.output[5]
    r3 = engine.generate(p, SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(stop_id,)))
    assert r3.output == req.output[:req.output.index(stop_id) + 1] and r3.finish_reason == "stop"


def test_sampling_options(model):
    engine = make_engine(model)
    p = prompts(1, seed=9)[0]
    a = engine.generate(p, SamplingParams(max_tokens=16, seed=3)).output
    assert engine.generate(p, SamplingParams(max_tokens=16, seed=3)).output == a
    assert engine.generate(p, SamplingParams(max_tokens=16, seed=4)).output != a
    assert engine.generate(p, SamplingParams(max_tokens=16, top_k=1, seed=5)).output == \
        engine.generate(p, greedy(16)).output
    assert engine.generate(p, SamplingParams(max_tokens=16, top_p=1e-6, seed=6)).output == \
        engine.generate(p, greedy(16)).output


def test_sampler_penalties_topk_mask():
    """The shared batched sampler: penalties, grammar mask and top-k, each row with its own settings."""
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0]).expand(4, 4)
    counts = torch.tensor([2.0, 0.0, 0.0, 0.0]).expand(4, 4)
    # row 0 plain, row 1 frequency 0.1 (3.0 - 0.2 < 2.9), row 2 presence 0.2, row 3 plain
    tokens, logp = sample(logits, 0.0, counts=counts, frequency_penalty=torch.tensor([0.0, 0.1, 0.0, 0.0]),
                          presence_penalty=torch.tensor([0.0, 0.0, 0.2, 0.0]))
    assert tokens.tolist() == [0, 1, 1, 0] and logp.tolist() == [0.0] * 4
    allowed = torch.tensor([False, False, True, True]).expand(4, 4)
    assert sample(logits, 0.0, allowed=allowed)[0].tolist() == [2] * 4
    g = torch.Generator().manual_seed(0)
    top_k = torch.tensor([2, 0])
    draws = [sample(logits[:2], 2.0, top_k=top_k, uniform=torch.rand(2, generator=g))[0] for _ in range(300)]
    assert {int(d[0]) for d in draws} == {0, 1} and {int(d[1]) for d in draws} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_sampler_draws_the_stated_distribution():
    """Inverse-CDF draws follow softmax(logits / T) restricted to the nucleus, and the returned log-probability
    is that of the renormalized distribution actually sampled from."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    tokens, logp = sample(logits, 1.0, top_p=0.7, uniform=u)
    kept = torch.tensor([0.5, 0.3]) / 0.8
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert freq[2:].sum() == 0 and (freq[:2] - kept).abs().max() < 0.015
    assert torch.allclose(logp, kept.log()[tokens])
    tokens, logp = sample(logits, 0.5, uniform=u)
    sharp = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    sharp /= sharp.sum()
    assert torch.allclose(logp, sharp.log()[tokens], atol=1e-6)
    assert (torch.bincount(tokens, minlength=4).float() / len(tokens) - sharp).abs().max() < 0.015
    # a draw at the very top of the CDF never lands on an id that was cut
    token, logp = sample(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), 1.0, top_k=2, uniform=torch.tensor([1.0]))
    assert token.item() in (0, 1) and torch.isfinite(logp).all()


def test_logprobs_are_the_model_distribution(model):
    engine = make_engine(model)
    p = prompts(1, seed=11)[0]
    events = []
    req = engine.submit(p, SamplingParams(max_tokens=6, temperature=0.7, seed=1, logprobs=3), events.append)
    while not req.done.is_set():
        engine.step()
    ids = torch.tensor([p + req.output])
    with torch.no_grad():
        ref = model(ids)[0, len(p) - 1:-1].float().log_softmax(-1)
    for i, e in enumerate(e for e in events if e.token is not None):
        assert math.isclose(e.logprob, float(ref[i, e.token]), abs_tol=1e-4)
        assert [t for t, _ in e.top_logprobs] == ref[i].topk(3).indices.tolist()


def test_cancellation_frees_the_slot(model):
    engine = make_engine(model, max_slots=1)
    engine.start()
    try:
        first = threading.Event()
        events = []
        req = engine.submit(prompts(1)[0], SamplingParams(max_tokens=100, temperature=0.0),
                            lambda e: (events.append(e), first.set()))
        assert first.wait(30)
        req.cancel()
        assert req.done.wait(10) and req.finish_reason == "abort" and len(req.output) < 100
        t0 = time.time()
        assert engine.generate(prompts(1)[0], greedy(2)).finish_reason == "length"  # the one slot is free again
        assert time.time() - t0 < 30
    finally:
        engine.shutdown()


def test_memory_budget_and_limits(model):
    per_token = model.config.cache_bytes_per_token(4)
    engine = make_engine(model, cache_bytes=3 * 128 * per_token + 5)
    assert engine.slots == 3 and engine.cache.nbytes == 3 * 128 * per_token
    with pytest.raises(ValueError, match="holds no slot"):
        make_engine(model, cache_bytes=per_token)
    with pytest.raises(EngineError, match="maximum context length is 128") as e:
        engine.submit([1] * 100, SamplingParams(max_tokens=29))
    assert e.value.status == 400
    small = make_engine(model, max_queue=1)
    small.submit([1], greedy())
    with pytest.raises(EngineError, match="queue is full") as e:
        small.submit([1], greedy())
    assert e.value.status == 429
    small.shutdown(drain=False)
    with pytest.raises(EngineError, match="shutting down") as e:
        small.submit([1], greedy())
    assert e.value.status == 503
