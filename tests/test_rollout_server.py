"""RL rollouts from an OpenAI-compatible server, against k2lab's own (in a thread, tiny random model): token-id
prompts in, token ids and the sampling distribution's log-probs out (vLLM's `return_tokens_as_token_ids` and
`--logprobs-mode processed_logprobs`) through the openai client; SGLang's `POST /update_weights_from_disk`;
`k2lab rl --rollout-url` with the weight sync between steps and bounded staleness, checked against the
trainer's own policy (the log-ratio of the server's log-probs to the policy's)."""

from __future__ import annotations

import httpx
import pytest
import torch
from openai import BadRequestError, OpenAI

import k2lab
from k2lab.runs import read_jsonl
from k2lab.serve.rollout import RolloutParams
from k2lab.serve.rollout_client import RemoteGenerator
from k2lab.serve.server import build_server, serve_in_thread
from k2lab.tokenizer import Tokenizer
from k2lab.train.rl.run import rl
from k2lab.train.settings import RLSettings
from tests.test_distributed_posttrain import stopping_model


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from k2lab.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("policy")
    k2lab.save_model(stopping_model(train_tokenizer(640, out_dir=d, max_bytes=100_000)), d)
    return d


@pytest.fixture()
def served(policy):
    server = build_server(policy, max_len=1024, cache_mb=16, max_slots=16, logprobs_mode="processed_logprobs")
    with serve_in_thread(server) as url:
        yield server, url


def _logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each completion token, by a plain forward of the whole sequence."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids[:, :-1]).float()[0, len(prompt) - 1:] / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_token_ids_in_token_ids_and_sampling_logprobs_out(served, policy):
    server, url = served
    client = OpenAI(base_url=url, api_key="x")
    prompt = Tokenizer.load(policy).encode("def add(a, b):")
    kw = dict(model=server.model_name, prompt=prompt, n=3, max_tokens=6, temperature=0.7, seed=11, logprobs=0,
              extra_body={"return_tokens_as_token_ids": True})
    out = client.completions.create(**kw)
    model = k2lab.load_model(policy, dtype=torch.float32)
    for choice in out.choices:
        assert all(t.startswith("token_id:") for t in choice.logprobs.tokens)
        ids = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
        assert 1 <= len(ids) <= 6
        expected = _logprobs(model, prompt, ids, 0.7)  # the distribution sampled from, at temperature 0.7
        torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs), expected, atol=1e-4, rtol=1e-4)
    again = client.completions.create(**kw)  # same seed, same samples
    assert [c.logprobs.tokens for c in again.choices] == [c.logprobs.tokens for c in out.choices]
    with pytest.raises(BadRequestError, match="processed"):  # alternatives are not computed in this mode
        client.completions.create(**{**kw, "logprobs": 2})

    gen = RemoteGenerator(url, policy_version=7)
    samples = gen.generate([prompt, prompt[:3]], 2, RolloutParams(max_new_tokens=5, temperature=0.7, seed=11))
    assert [(s.prompt_index, s.sample_index, s.policy_version) for s in samples] == \
        [(0, 0, 7), (0, 1, 7), (1, 0, 7), (1, 1, 7)]
    for s in samples:
        torch.testing.assert_close(torch.tensor(s.logprobs), _logprobs(model, s.prompt_ids, s.completion_ids, 0.7),
                                   atol=1e-4, rtol=1e-4)


def test_update_weights_from_disk(served, policy, tmp_path):
    server, url = served
    root = url.removesuffix("/v1")
    tok = Tokenizer.load(policy)
    other = stopping_model(tok, seed=1)
    k2lab.save_model(other, tmp_path / "new")
    prompt = tok.encode("x = 1")
    gen = RemoteGenerator(url)
    params = RolloutParams(max_new_tokens=4, temperature=1.0, seed=3)

    r = httpx.post(f"{root}/update_weights_from_disk", json={"model_path": str(tmp_path / "new")})
    assert r.status_code == 200 and r.json()["success"] is True and r.json()["num_paused_requests"] == 0
    sample = gen.generate([prompt], 1, params)[0]
    torch.testing.assert_close(torch.tensor(sample.logprobs),
                               _logprobs(other.float(), prompt, sample.completion_ids, 1.0), atol=1e-4, rtol=1e-4)

    r = httpx.post(f"{root}/update_weights_from_disk", json={"model_path": str(tmp_path / "nowhere")})
    assert r.status_code == 400 and r.json()["success"] is False and "no config.json" in r.json()["message"]
    from tests.conftest import random_model, tiny_config

    small = tiny_config(vocab_size=tok.vocab_size, hidden_size=32, num_attention_heads=2)  # another shape
    k2lab.save_model(random_model(small), tmp_path / "small")
    r = httpx.post(f"{root}/update_weights_from_disk", json={"model_path": str(tmp_path / "small")})
    assert r.status_code == 400 and "does not fit" in r.json()["message"]
    assert gen.generate([prompt], 1, params)[0].logprobs == sample.logprobs  # the served weights stayed
    r = httpx.post(f"{root}/update_weights_from_disk", json={"model_path": "x", "weight_version": "3"})
    assert r.status_code == 400 and "weight_version" in r.json()["error"]["message"]  # never silently ignored


RL = dict(env="arithmetic,knowledge", max_steps=3, batch_size=4, samples=2, max_new_tokens=8, max_turns=2,
          lr=1e-3, warmup_steps=0, optimizer="adamw", seed=1)


def test_rl_from_the_server_syncs_weights_and_bounds_staleness(served, policy, tmp_path):
    server, url = served
    inproc = rl(RLSettings(checkpoint=str(policy), run_dir=str(tmp_path / "inproc"), **RL))
    remote = rl(RLSettings(checkpoint=str(policy), run_dir=str(tmp_path / "remote"), rollout_url=url, **RL))
    assert server.engine.generated_tokens > 0
    ref, got = read_jsonl(tmp_path / "inproc" / "metrics.jsonl"), read_jsonl(tmp_path / "remote" / "metrics.jsonl")
    for a, b in zip(ref, got):
        # both sample with the current policy: the sampler's log-probs are the policy's (the server's after each
        # reload); the samples differ (other random streams), the step's tasks and versions do not
        assert a["log_ratio_max_abs"] < 1e-3 and b["log_ratio_max_abs"] < 1e-3
        assert a["policy_version"] == b["policy_version"] == a["step"] - 1
        assert a["staleness_max"] == b["staleness_max"] == 0
    assert inproc["step"] == remote["step"] == 3
    assert [p.name for p in (tmp_path / "remote" / "policy").iterdir()] == ["step-000002"]  # the one served

    stale = rl(RLSettings(checkpoint=str(policy), run_dir=str(tmp_path / "stale"), rollout_url=url,
                          max_staleness=1, **RL))
    rows = read_jsonl(tmp_path / "stale" / "metrics.jsonl")
    assert [r["staleness_max"] for r in rows] == [0, 1, 0] and [r["policy_version"] for r in rows] == [0, 0, 2]
    assert rows[1]["log_ratio_max_abs"] > 1e-3  # sampled by the step-0 policy, trained from the step-1 one
    assert rows[0]["log_ratio_max_abs"] < 1e-3 and rows[2]["log_ratio_max_abs"] < 1e-3
    assert stale["step"] == 3
