"""The OpenAI-compatible server with the official `openai` client (sync and async, stream and not) against a
server on a free loopback port, serving a tiny checkpoint trained briefly with `k2lab pretrain`."""

import asyncio
import json
import time

import httpx
import openai
import pytest

from k2lab.serve.sampling import SamplingParams
from k2lab.serve.server import Server
from tests.serve_helpers import checkpoint_server, make_checkpoint, scripted_server, serve_in_thread

MSG = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def server(checkpoint):
    return checkpoint_server(checkpoint)


@pytest.fixture(scope="module")
def url(server):
    with serve_in_thread(server) as base:
        yield base


def client(url, **kw):
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, **kw)


def test_models_health_metrics(url, server):
    models = client(url).models.list().data
    assert [m.id for m in models] == [server.model_name]
    root = url.removesuffix("/v1")
    assert httpx.get(f"{root}/health").json() == {"status": "ok"}
    text = httpx.get(f"{root}/metrics").text
    for name in ("queue_depth", "running_requests", "generation_tokens_per_second", "cache_usage_ratio"):
        assert f"# TYPE k2lab_{name} gauge" in text and f"\nk2lab_{name} " in text


def test_chat_sync_stream_and_not(url, server):
    c = client(url)
    kw = dict(model=server.model_name, messages=MSG, temperature=0, max_tokens=12)
    whole = c.chat.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_async_concurrent_matches_sync(url, server):
    kw = dict(model=server.model_name, temperature=0, max_tokens=10)
    prompts = [[{"role": "user", "content": f"Count to {n}."}] for n in range(4)]
    alone = [client(url).chat.completions.create(messages=m, **kw).choices[0].message.content for m in prompts]

    async def go():
        ac = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)

        async def streamed(m):
            out = ""
            async for ch in await ac.chat.completions.create(messages=m, stream=True, **kw):
                out += ch.choices[0].delta.content or "" if ch.choices else ""
            return out

        whole = await asyncio.gather(*(ac.chat.completions.create(messages=m, **kw) for m in prompts))
        return [w.choices[0].message.content for w in whole], await asyncio.gather(*map(streamed, prompts))

    whole, streamed = asyncio.run(go())
    assert whole == alone and streamed == alone


def test_completions_and_logprobs(url, server):
    c = client(url)
    kw = dict(model=server.model_name, prompt="def main():", temperature=0, max_tokens=8, logprobs=2)
    whole = c.completions.create(**kw)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True) if ch.choices)
    assert streamed == whole.choices[0].text
    lp = whole.choices[0].logprobs
    assert len(lp.token_logprobs) == whole.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    # vLLM's stop_token_ids extension: stop at the id the model produces second
    out = server.engine.generate(server.tokenizer.encode("def main():"),
                                 SamplingParams(max_tokens=8, temperature=0.0)).output
    cut = c.completions.create(**kw, extra_body={"stop_token_ids": [out[1]]})
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == out.index(out[1]) + 1
    chat = c.chat.completions.create(model=server.model_name, messages=MSG, max_tokens=5, logprobs=True,
                                     top_logprobs=3, seed=1)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 for e in chat.choices[0].logprobs.content)


def test_seeded_sampling_reproducible(url, server):
    c = client(url)
    kw = dict(model=server.model_name, messages=MSG, temperature=1.0, top_p=0.9, max_tokens=12, seed=7)
    assert c.chat.completions.create(**kw).choices[0].message.content == \
        c.chat.completions.create(**kw).choices[0].message.content


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "nope", "messages": MSG}, 404, "does not exist"),
    ({"messages": MSG}, 400, "model"),
    ({"model": "M", "messages": []}, 400, "messages"),
    ({"model": "M", "messages": MSG, "temperature": 3}, 400, "temperature"),
    ({"model": "M", "messages": MSG, "n": 17}, 400, "n"),
    # a top_k past int64 crashed the engine step (500; found by the fuzz test on a fresh clone)
    ({"model": "M", "messages": MSG, "top_k": 2299110436515375993963151360}, 400, "top_k"),
    ({"model": "M", "messages": MSG, "suffix": "x"}, 400, "`suffix` is not supported"),
    ({"model": "M", "messages": MSG, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"model": "M", "messages": MSG, "chat_template_kwargs": {"no_such_option": True}}, 400, "no_such_option"),
    ({"model": "M", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ({"model": "M", "messages": MSG, "max_tokens": 10_000}, 400, "maximum context length is 256"),
    ({"model": "M", "messages": [{"role": "user", "content": "word " * 400}]}, 400, "maximum context length"),
    ({"model": "M", "messages": MSG, "tool_choice": "required"}, 400, "tool_choice"),
    ({"model": "M", "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "not among the tools"),
    ({"model": "M", "messages": [{"role": "tool", "content": "x"}]}, 400, "tool_call_id"),
])
def test_bad_requests_get_openai_errors(url, server, body, status, needle):
    body = {k: (server.model_name if v == "M" else v) for k, v in body.items()}
    r = httpx.post(f"{url}/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] + str(err["param"]) and err["type"]


def test_malformed_json_and_unknown_route(url):
    r = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(f"{url}/nowhere").status_code == 404


def test_api_key_and_full_queue(checkpoint, server):
    keyed = Server(server.engine.__class__(server.engine.model, server.tokenizer.id_to_bytes,
                                           server.engine.eos_ids, max_len=64, max_slots=1, max_queue=0),
                   server.tokenizer, "m", api_key="sekret")
    with serve_in_thread(keyed) as base:
        with pytest.raises(openai.AuthenticationError):
            client(base).models.list()
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            openai.OpenAI(base_url=base, api_key="sekret", max_retries=0).chat.completions.create(
                model="m", messages=MSG, max_tokens=2)


def test_disconnect_frees_the_slot(server):
    """A scripted model (test double, 20 ms per step) keeps the request generating while the client leaves."""
    scripted = scripted_server(server.tokenizer, "word " * 300, delay=0.02)
    with serve_in_thread(scripted) as base:
        body = {"model": "scripted", "messages": MSG, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{base}/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            deadline = time.time() + 2  # the first chunk can precede the request's first engine step
            while not scripted.engine.running and time.time() < deadline:
                time.sleep(0.005)
            running = list(scripted.engine.running)
            assert running
        deadline = time.time() + 2
        while scripted.engine.running and time.time() < deadline:
            time.sleep(0.01)
        req = running[0]
        assert not scripted.engine.running and req.finish_reason == "abort" and len(req.output) < 100
        assert len(scripted.engine.free) == scripted.engine.slots


# ---- the tool-call path, end to end with a test double for the network -------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALLS = ("<think>The user wants weather.</think>Checking.<|tool_calls_section_begin|>"
         "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|>"
         "<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{\"city\": \"Rome\"}<|tool_call_end|>"
         "<|tool_calls_section_end|>")


def test_tool_calls_end_to_end_with_scripted_model(server):
    """ScriptedModel is a test double for the network only: it emits CALLS token by token; the engine, chat
    template, server and tool-call parser are the real ones."""
    with serve_in_thread(scripted_server(server.tokenizer, CALLS)) as base:
        c = client(base)
        kw = dict(model="scripted", messages=[{"role": "user", "content": "Weather in Paris and Rome?"}],
                  tools=TOOLS, temperature=0)
        msg = c.chat.completions.create(**kw)
        assert msg.choices[0].finish_reason == "tool_calls"
        m = msg.choices[0].message
        assert m.content == "Checking." and m.reasoning_content == "The user wants weather."
        assert [(t.id, t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls] == [
            ("functions.get_weather:0", "get_weather", {"city": "Paris"}),
            ("functions.get_weather:1", "get_weather", {"city": "Rome"})]
        calls, content, reasoning, reasons = {}, "", "", []
        for ch in c.chat.completions.create(**kw, stream=True):
            d = ch.choices[0].delta
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            reasons.append(ch.choices[0].finish_reason)
            for tc in d.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "args": ""})
                entry["args"] += tc.function.arguments or ""
        assert content == "Checking." and reasoning == "The user wants weather." and reasons[-1] == "tool_calls"
        assert [(v["id"], v["name"], json.loads(v["args"])) for _, v in sorted(calls.items())] == \
            [(t.id, t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls]
        # without tools the same output is plain content and reasoning, finish_reason stop
        plain = c.chat.completions.create(model="scripted", messages=MSG, temperature=0).choices[0]
        assert plain.finish_reason == "stop" and plain.message.tool_calls is None
        assert plain.message.content == "Checking."
