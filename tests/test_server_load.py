"""Bounded load test: many concurrent streaming clients, zero errors, and every greedy output equal to the same
request run alone (on a fresh engine, one request at a time). Random tiny weights: outputs are gibberish, but
equal gibberish is exactly what batch-independence means."""

import asyncio
import random

import openai
import pytest
import torch

from k2lab.model import K2ForCausalLM
from k2lab.serve.engine import Engine
from k2lab.serve.sampling import SamplingParams
from k2lab.serve.server import Server
from k2lab.tokenizer import train_tokenizer
from tests.serve_helpers import VOCAB, serve_in_thread, tiny_model_config

WORDS = "alpha beta gamma delta print def class return import yield lambda async await with".split()


@pytest.fixture(scope="module")
def parts():
    tok = train_tokenizer(VOCAB, max_bytes=300_000)
    torch.manual_seed(3)
    model = K2ForCausalLM(tiny_model_config(tok)).eval()
    return tok, model


def engine(tok, model, slots):
    return Engine(model, tok.id_to_bytes, (tok.eos_id, tok.im_end_id), max_len=128, max_slots=slots,
                  prefill_chunk=128)


def load(parts, clients: int, distinct: int, repeats: int, max_tokens: int = 6):
    tok, model = parts
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 20))) for _ in range(distinct)]
    ref = engine(tok, model, 1)
    alone = {p: ref.generate(tok.encode(p), SamplingParams(max_tokens=max_tokens, temperature=0.0)).text
             for p in prompts}
    jobs = prompts * repeats
    rng.shuffle(jobs)
    server = Server(engine(tok, model, clients), tok, "tiny")
    errors, outputs = [], []

    async def go(base):
        client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
        gate = asyncio.Semaphore(clients)

        async def one(p):
            async with gate:
                try:
                    text = ""
                    async for ch in await client.completions.create(model="tiny", prompt=p, max_tokens=max_tokens,
                                                                    temperature=0, stream=True):
                        text += ch.choices[0].text if ch.choices else ""
                    outputs.append((p, text))
                except Exception as e:  # counted, the test asserts there are none
                    errors.append(repr(e))

        await asyncio.gather(*map(one, jobs))

    with serve_in_thread(server) as base:
        asyncio.run(go(base))
    assert errors == []
    assert len(outputs) == len(jobs)
    mismatched = [(p, t, alone[p]) for p, t in outputs if t != alone[p]]
    assert mismatched == []


def test_load_64_clients_320_requests(parts):
    load(parts, clients=64, distinct=64, repeats=5)
