"""OpenAI API details beyond the basics: GET /v1/models/{id}, n > 1, logit_bias, echo, and what happens to work
whose client is gone (non-streaming disconnect frees the slot) or waiting (/metrics counts it). Random tiny
weights, or a scripted test double for the network where the test needs a long generation."""

import threading
import time

import httpx
import openai
import pytest
import torch

from k2lab.model import K2ForCausalLM
from k2lab.serve.engine import Engine
from k2lab.serve.server import Server
from k2lab.tokenizer import train_tokenizer
from tests.serve_helpers import VOCAB, scripted_server, serve_in_thread, tiny_model_config

MSG = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(VOCAB, max_bytes=300_000)


@pytest.fixture(scope="module")
def url(tok):
    torch.manual_seed(0)
    engine = Engine(K2ForCausalLM(tiny_model_config(tok)).eval(), tok.id_to_bytes, (tok.eos_id, tok.im_end_id),
                    max_len=256, max_slots=8)
    with serve_in_thread(Server(engine, tok, "tiny")) as base:
        yield base


def client(url):
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


def test_model_by_id(url):
    assert client(url).models.retrieve("tiny").id == "tiny"
    r = httpx.get(f"{url}/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and "nope" in r.json()["error"]["message"]


def test_n_choices_whole_and_streamed(url):
    c = client(url)
    kw = dict(model="tiny", messages=MSG, temperature=1.0, max_tokens=8, seed=11,
              extra_body={"chat_template_kwargs": {"thinking": False}})  # the answer as content, not reasoning
    three = c.chat.completions.create(**kw, n=3)
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    assert three.choices[0].message.content == c.chat.completions.create(**kw).choices[0].message.content
    assert len({ch.message.content for ch in three.choices}) > 1  # each choice has its own seed
    streamed = {}
    for chunk in c.chat.completions.create(**kw, n=3, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    assert [streamed[i] for i in range(3)] == [ch.message.content for ch in three.choices]
    texts = c.completions.create(model="tiny", prompt="def", max_tokens=5, n=2, seed=3)
    assert [ch.index for ch in texts.choices] == [0, 1]


def test_logit_bias(url, tok):
    c = client(url)
    kw = dict(model="tiny", prompt="def main():", max_tokens=6, temperature=0)
    free = c.completions.create(**kw, logprobs=0)
    forced = tok.encode(" alpha")[0]
    out = c.completions.create(**kw, logit_bias={str(forced): 100}, logprobs=0)
    assert out.choices[0].logprobs.tokens == [tok.id_to_piece(forced)] * 6
    chosen = free.choices[0].logprobs.tokens[0]
    banned = c.completions.create(**kw, logit_bias={str(tok.encode(chosen)[0]): -100}, logprobs=0)
    assert banned.choices[0].logprobs.tokens[0] != chosen


def test_echo(url, tok):
    c = client(url)
    kw = dict(model="tiny", prompt="def main():", max_tokens=4, temperature=0)
    plain = c.completions.create(**kw).choices[0].text
    assert c.completions.create(**kw, echo=True).choices[0].text == "def main():" + plain
    assert "".join(ch.choices[0].text for ch in c.completions.create(**kw, echo=True, stream=True)
                   if ch.choices) == "def main():" + plain
    with pytest.raises(openai.BadRequestError, match="echo"):
        c.completions.create(**kw, echo=True, logprobs=1)
    ids = c.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2, temperature=0, echo=True)
    assert ids.choices[0].text.startswith(tok.decode([5, 6, 7]))
    with pytest.raises(openai.BadRequestError, match="prompt token ids"):
        c.completions.create(model="tiny", prompt=[VOCAB + 5], max_tokens=2, echo=True)


def test_non_streaming_disconnect_frees_the_slot(tok):
    """A scripted model (test double, 20 ms per step) keeps a non-streaming request generating; the client gives up."""
    scripted = scripted_server(tok, "word " * 300, delay=0.02)
    with serve_in_thread(scripted) as base:
        body = {"model": "scripted", "messages": MSG, "max_tokens": 250}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.5))
        (req,) = scripted.engine.running or [None]
        assert req is not None  # still generating when the client left
        at_leave = len(req.output)
        deadline = time.time() + 2
        while scripted.engine.running and time.time() < deadline:
            time.sleep(0.005)
        assert not scripted.engine.running and req.finish_reason == "abort"
        assert len(req.output) - at_leave <= 5  # freed within a few engine steps
        assert len(scripted.engine.free) == scripted.engine.slots


def test_metrics_count_running_and_waiting(tok):
    scripted = scripted_server(tok, "word " * 300, delay=0.02)  # 2 slots
    with serve_in_thread(scripted) as base:
        body = {"model": "scripted", "messages": MSG, "max_tokens": 200}
        threads = [threading.Thread(target=_post_quietly, args=(f"{base}/chat/completions", body)) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.time() + 3
        # wait for the state to assert (a request admitted a moment later than the others sits in `waiting` first)
        while (len(scripted.engine.running), len(scripted.engine.waiting)) != (2, 1) and time.time() < deadline:
            time.sleep(0.01)
        text = httpx.get(base.removesuffix("/v1") + "/metrics").text
        assert "\nk2lab_running_requests 2\n" in text and "\nk2lab_queue_depth 1\n" in text
        for t in threads:
            t.join()


def _post_quietly(url: str, body: dict) -> None:
    try:
        httpx.post(url, json=body, timeout=httpx.Timeout(5, read=1.5))
    except httpx.ReadTimeout:  # the client gives up; the server cancels its request
        pass


def test_default_chat_template_kwargs_apply_unless_the_request_sets_them(tok):
    """The server's default chat_template_kwargs (vLLM's --default-chat-template-kwargs): a model trained with
    thinking off is served with `<think></think>` after the generation prompt; a request's own kwargs win; an
    option the chat format does not take is refused when the server is built."""
    from k2lab.serve.server import Server

    base = scripted_server(tok, "hi")
    server = Server(base.engine, tok, "scripted", default_template_kwargs={"thinking": False})
    messages = [{"role": "user", "content": "hello"}]
    assert server.chat_ids(messages, None)[-2:] == [tok.special_tokens["<think>"], tok.special_tokens["</think>"]]
    assert server.chat_ids(messages, None) == base.chat_ids(messages, None, {"thinking": False})
    assert server.chat_ids(messages, None, {"thinking": True}) == base.chat_ids(messages, None)
    assert base.chat_ids(messages, None) != server.chat_ids(messages, None)
    with pytest.raises(ValueError, match="not options"):
        Server(base.engine, tok, "scripted", default_template_kwargs={"colour": "blue"})
