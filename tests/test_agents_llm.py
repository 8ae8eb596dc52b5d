"""LLM client against the scripted server: a real OpenAI-compatible HTTP server on loopback that plays back
scripted replies (a test double for the model; the client, HTTP and retries are what is under test)."""

import asyncio

import openai
import pytest

from k2lab.agents.llm import LLM
from k2lab.testing.scripted_server import Faults, ScriptedServer


def echo(req):
    if req.step == 0 and "add" in req.tools:
        return {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}], "reasoning_content": "think"}
    return {"content": f"echo:{req.user}", "usage": {"prompt_tokens": 10, "completion_tokens": 3}}


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]


def test_env_fallback_and_errors(monkeypatch):
    for k in ("K2LAB_BASE_URL", "K2LAB_API_KEY", "K2LAB_MODEL", "OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="K2LAB_BASE_URL"):
        LLM(model="m")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://o/v1")
    monkeypatch.setenv("OPENAI_MODEL", "om")
    assert (LLM().base_url, LLM().model) == ("http://o/v1", "om")
    monkeypatch.setenv("K2LAB_BASE_URL", "http://k/v1")
    monkeypatch.setenv("K2LAB_MODEL", "km")
    monkeypatch.setenv("K2LAB_API_KEY", "secret")
    llm = LLM()
    assert (llm.base_url, llm.model, llm.api_key) == ("http://k/v1", "km", "secret")
    assert LLM(model="arg").model == "arg"


def test_with_no_model_named_the_endpoints_only_model_is_used(monkeypatch):
    """`k2lab serve` serves one model: a client given only the URL asks /models and calls that one. An endpoint
    listing several (or none), answering /models with an error, or not answering at all, is one clear error."""
    from k2lab.agents.llm import EndpointError

    for k in ("K2LAB_MODEL", "OPENAI_MODEL"):
        monkeypatch.delenv(k, raising=False)
    with ScriptedServer(echo, models=("k2lab-int4",)) as srv:
        llm = LLM(base_url=srv.base_url, api_key="k")
        assert llm.model == "k2lab-int4"

        async def go():
            async with llm:
                return await llm.chat([{"role": "user", "content": "hi"}])
        assert asyncio.run(go()).message["content"] == "echo:hi"
        assert srv.stats.requests == 1
        with pytest.raises(EndpointError, match=r"no model name configured, and .*/v1/nope/models does not list "
                                                r"the served one \(HTTP Error 404.*--model NAME"):
            LLM(base_url=srv.base_url.replace("/v1", "/v1/nope"))
    for models, listed in ((("a", "b"), "lists 2 models: a, b;"), ((), "lists 0 models;")):
        with ScriptedServer(echo, models=models) as srv, pytest.raises(EndpointError, match=listed + " pass --model"):
            LLM(base_url=srv.base_url)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EndpointError, match=f"cannot reach the model endpoint .*:{port}/v1: connection refused"):
        LLM(base_url=f"http://127.0.0.1:{port}/v1")


def test_chat_tool_calls_usage_and_cost():
    with ScriptedServer(echo) as srv:
        llm = LLM(base_url=srv.base_url, api_key="k", model="m", price_per_mtok=(1.0, 2.0))

        async def go():
            r1 = await llm.chat([{"role": "user", "content": "hi"}], tools=TOOLS, temperature=0.0)
            r2 = await llm.chat([{"role": "user", "content": "hi"}])
            return r1, r2
        r1, r2 = asyncio.run(go())
    assert r1.finish_reason == "tool_calls" and r1.message["reasoning_content"] == "think"
    assert r1.tool_calls[0]["function"]["name"] == "add" and r1.tool_calls[0]["function"]["arguments"] == '{"a": 1, "b": 2}'
    assert r2.message == {"role": "assistant", "content": "echo:hi"} and r2.finish_reason == "stop"
    assert r2.usage["prompt_tokens"] == 10 and r2.usage["cost_usd"] == pytest.approx((10 * 1 + 3 * 2) / 1e6)
    assert llm.usage.calls == 2 and llm.usage.retries == 0
    with pytest.raises(ValueError, match="stream"):
        asyncio.run(llm.chat([{"role": "user", "content": "hi"}], stream=True))


def test_streaming_sse_is_well_formed():
    with ScriptedServer(echo) as srv:
        async def go():
            client = openai.AsyncOpenAI(base_url=srv.base_url, api_key="k")
            stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 40}],
                                                          stream=True, stream_options={"include_usage": True})
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
            return text, usage
        text, usage = asyncio.run(go())
    assert text == "echo:" + "x" * 40 and usage.completion_tokens == 3


def test_retries_through_injected_faults():
    faults = Faults(rate=0.2, hang_s=3.0, seed=1)  # hangs outlast the client timeout by far
    with ScriptedServer(echo, faults=faults) as srv:
        llm = LLM(base_url=srv.base_url, api_key="k", model="m", timeout=1.0, backoff=(0.01, 0.05), max_retries=10)

        async def go():
            return await asyncio.gather(*[llm.chat([{"role": "user", "content": str(i)}]) for i in range(100)])
        results = asyncio.run(go())
        stats = srv.stats
    assert [r.message["content"] for r in results] == [f"echo:{i}" for i in range(100)]
    assert all(stats.faults[k] > 0 for k in ("429", "500", "timeout"))
    assert sum(r.retries for r in results) == llm.usage.retries == sum(stats.faults.values())


def test_gives_up_after_max_retries():
    with ScriptedServer(echo, faults=Faults(rate=1.0, kinds=("500",))) as srv:
        llm = LLM(base_url=srv.base_url, api_key="k", model="m", max_retries=2, backoff=(0.01, 0.01))
        with pytest.raises(openai.InternalServerError):
            asyncio.run(llm.chat([{"role": "user", "content": "x"}]))
        assert srv.stats.requests == 3


def test_rate_limits_shrink_concurrency_then_ramp_up():
    with ScriptedServer(echo, faults=Faults(rate=1.0, kinds=("429",))) as srv:
        llm = LLM(base_url=srv.base_url, api_key="k", model="m", max_concurrency=32, max_retries=0)

        async def go():
            failed = await asyncio.gather(*[llm.chat([{"role": "user", "content": "x"}]) for _ in range(8)],
                                          return_exceptions=True)
            low = llm.limiter.limit
            srv.faults.rate = 0.0
            await asyncio.gather(*[llm.chat([{"role": "user", "content": "x"}]) for _ in range(64)])
            return failed, low, llm.limiter.limit
        failed, low, high = asyncio.run(go())
    assert all(isinstance(e, openai.RateLimitError) for e in failed)
    assert low == 1.0  # halved on each of the 8 rate limits, floored at 1
    assert high == 32  # one more per success, capped


def test_a_refused_connection_fails_fast_and_says_so():
    """Nothing listens on the port: the client must not spend its retries (seconds of backoff) on it, and must
    say "connection refused" (the openai client itself reports a connect timeout)."""
    import socket
    import time

    from k2lab.agents.llm import EndpointError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = LLM(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", model="m", max_retries=6, backoff=(1.0, 20.0))

    async def go():
        async with llm:
            await llm.chat([{"role": "user", "content": "hi"}])
    t0 = time.perf_counter()
    with pytest.raises(EndpointError, match=f"127.0.0.1:{port}/v1: connection refused"):
        asyncio.run(go())
    assert time.perf_counter() - t0 < 3  # six retries with this backoff wait about 25 s on average
