"""`LLM`: an async client for any OpenAI-compatible chat-completions endpoint (k2lab's server, vLLM, Moonshot).

Endpoint, key and model come from the arguments, else `K2LAB_BASE_URL` / `K2LAB_API_KEY` / `K2LAB_MODEL`, else
`OPENAI_BASE_URL` / `OPENAI_API_KEY` / `OPENAI_MODEL`; with no model named, the endpoint's only model (its
`/models` list, as `k2lab serve` serves one). Every call has a timeout; 429, 5xx, timeouts and dropped
connections are retried with exponential backoff and full jitter (tenacity). An endpoint that cannot be connected
to at all (connection refused, unknown host) is a setup mistake, not a transient fault: it raises `EndpointError`
at once instead of being retried. A client-side concurrency limit
ramps back up after rate limiting: it halves on every 429 and grows by one per success up to
`max_concurrency` (additive increase, multiplicative decrease). Token usage and cost are accounted per instance;
agents keep their own totals from each `ChatResult.usage`. Close with `await llm.aclose()` or use
`async with LLM(...) as llm:`; the HTTP client belongs to the event loop of the first call.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from dataclasses import dataclass, field

import openai
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError)


class EndpointError(ValueError):
    """The model endpoint is not configured, or nothing answers at its address; the message says what to set."""


class ContextLengthError(ValueError):
    """The endpoint refused a prompt longer than the model's context; the message is the server's."""


def unreachable(e: BaseException | None) -> str | None:
    """Why a connection could not be made at all ("connection refused", "unknown host"), or None when the error
    is transient. The openai client reports a refused connection as a connect *timeout*, so look at the cause."""
    while e is not None:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return f"unknown host ({e.strerror})"
        e = e.__cause__ or e.__context__
    return None


def served_model(base_url: str, api_key: str | None, timeout: float = 10.0) -> str:
    """The model to call when none is configured: the endpoint's only one (GET /models), as `k2lab serve` serves
    one; an endpoint that lists several (or none), or cannot list them, is an EndpointError naming what to set."""
    import urllib.request

    url = base_url.rstrip("/") + "/models"
    fix = "pass --model NAME or set K2LAB_MODEL (or OPENAI_MODEL)"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            ids = [m["id"] for m in json.loads(r.read())["data"]]
    except (OSError, ValueError, KeyError, TypeError) as e:  # URLError and HTTPError are OSErrors
        reason = getattr(e, "reason", None)
        if why := unreachable(reason if isinstance(reason, BaseException) else e):
            raise EndpointError(f"cannot reach the model endpoint {base_url}: {why}; start the server (k2lab "
                                f"serve) or pass --base-url / set K2LAB_BASE_URL") from e
        raise EndpointError(f"no model name configured, and {url} does not list the served one ({e}); {fix}") from e
    if len(ids) != 1:
        shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
        raise EndpointError(f"no model name configured, and {url} lists {len(ids)} models"
                            f"{': ' + shown if ids else ''}; {fix}")
    return ids[0]


def _retryable(e: BaseException) -> bool:
    return isinstance(e, RETRYABLE) and unreachable(e) is None


@dataclass
class Usage:
    """Token and cost totals; `+=` another Usage or a ChatResult's usage dict."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    retries: int = 0
    cost_usd: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, prompt_tokens: int, completion_tokens: int, retries: int = 0, cost_usd: float = 0.0) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.calls += 1
        self.retries += retries
        self.cost_usd += cost_usd

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "calls": self.calls, "retries": self.retries, "cost_usd": round(self.cost_usd, 6)}


@dataclass
class ChatResult:
    message: dict  # OpenAI assistant message: role, content, tool_calls?, reasoning_content?
    finish_reason: str
    usage: dict  # prompt_tokens, completion_tokens, cost_usd
    retries: int
    latency_s: float
    rate_limited: int = 0  # how many of the retries were 429s

    @property
    def tool_calls(self) -> list[dict]:
        return self.message.get("tool_calls") or []


@dataclass
class AdaptiveLimit:
    """Concurrency limit that halves on a rate limit and grows by one per success (AIMD)."""

    maximum: int
    limit: float = 0.0
    active: int = 0
    _cond: asyncio.Condition = field(default_factory=asyncio.Condition)

    def __post_init__(self) -> None:
        self.limit = float(self.limit or self.maximum)

    async def __aenter__(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.active < int(self.limit))
            self.active += 1

    async def __aexit__(self, *exc) -> None:
        async with self._cond:
            self.active -= 1
            self._cond.notify_all()

    async def feedback(self, rate_limited: bool) -> None:
        async with self._cond:
            self.limit = max(1.0, self.limit / 2) if rate_limited else min(float(self.maximum), self.limit + 1)
            self._cond.notify_all()


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


class LLM:
    """`await LLM().chat(messages, tools=None, **sampling) -> ChatResult`."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str | None = None,
                 timeout: float = 60.0, max_retries: int = 6, max_concurrency: int = 64,
                 initial_concurrency: int | None = None, backoff: tuple[float, float] = (0.5, 20.0),
                 price_per_mtok: tuple[float, float] = (0.0, 0.0)):
        self.base_url = base_url or _env("K2LAB_BASE_URL", "OPENAI_BASE_URL")
        self.api_key = api_key or _env("K2LAB_API_KEY", "OPENAI_API_KEY")
        self.model = model or _env("K2LAB_MODEL", "OPENAI_MODEL")
        if not self.base_url:
            raise EndpointError("no model endpoint configured; pass --base-url URL or set K2LAB_BASE_URL "
                                "(or OPENAI_BASE_URL), e.g. http://127.0.0.1:8000/v1 for `k2lab serve`")
        if not self.model:
            self.model = served_model(self.base_url, self.api_key)
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError(f"LLM: need max_concurrency >= 1, max_retries >= 0, timeout > 0; got "
                             f"{max_concurrency}, {max_retries}, {timeout}")
        self.timeout, self.max_retries = timeout, max_retries
        self.max_concurrency = max_concurrency
        self.initial_concurrency = initial_concurrency or max_concurrency
        self.backoff, self.price_per_mtok = backoff, price_per_mtok
        self.usage = Usage()
        self._loop: asyncio.AbstractEventLoop | None = None  # client and limiter belong to one event loop

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            # aiohttp transport: about half the client CPU per call of the default httpx2 one under many
            # concurrent calls (openai's recommendation for concurrency)
            self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none",
                                              timeout=self.timeout, max_retries=0,
                                              http_client=openai.DefaultAioHttpClient(timeout=self.timeout))
            self.limiter = AdaptiveLimit(self.max_concurrency, self.initial_concurrency)

    async def aclose(self) -> None:
        """Close the HTTP connections (call from the event loop that used them)."""
        if self._loop is not None:
            await self._client.close()
            self._loop = None

    async def __aenter__(self) -> "LLM":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        p_in, p_out = self.price_per_mtok
        return (prompt_tokens * p_in + completion_tokens * p_out) / 1e6

    async def chat(self, messages: list[dict], tools: list[dict] | None = None, **sampling) -> ChatResult:
        """One chat completion, retried on transient errors; raises the last error when retries run out."""
        if sampling.get("stream"):
            raise ValueError("LLM.chat returns whole messages; stream=True is not supported")
        self._bind()
        kwargs = {"model": self.model, "messages": messages, **sampling}
        if tools:
            kwargs["tools"] = tools
        t0, retries, rate_limited = time.perf_counter(), 0, 0
        retrying = AsyncRetrying(retry=retry_if_exception(_retryable), reraise=True,
                                 stop=stop_after_attempt(self.max_retries + 1),
                                 wait=wait_random_exponential(multiplier=self.backoff[0], max=self.backoff[1]))
        try:
            async for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        retries += 1
                    try:
                        async with self.limiter:
                            # plain JSON in and out: skips the SDK's per-call TypedDict transform of every message
                            # (about 10 ms for a long conversation) and its pydantic model of the response
                            raw = await self._client.post("/chat/completions", body=kwargs, cast_to=bytes)
                    except openai.RateLimitError:
                        rate_limited += 1
                        await self.limiter.feedback(rate_limited=True)
                        raise
        except openai.BadRequestError as e:
            # OpenAI and k2lab's server send code context_length_exceeded; vLLM only says so in the message
            if e.code == "context_length_exceeded" or "maximum context length" in str(e):
                raise ContextLengthError(str(e)) from e
            raise
        except openai.APIConnectionError as e:
            if why := unreachable(e):
                raise EndpointError(f"cannot reach the model endpoint {self.base_url}: {why}; start the server "
                                    "(k2lab serve) or pass --base-url / set K2LAB_BASE_URL") from e
            raise
        await self.limiter.feedback(rate_limited=False)
        resp = json.loads(raw)
        if not resp.get("choices"):
            raise ValueError(f"endpoint answered without choices: {raw[:300]!r}")
        choice = resp["choices"][0]
        message = {"role": "assistant", "content": None} | {k: v for k, v in choice["message"].items() if v is not None}
        u = resp.get("usage") or {}
        p, c = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
        cost = self.cost(p, c)
        self.usage.add(p, c, retries, cost)
        return ChatResult(message=message, finish_reason=choice.get("finish_reason") or "stop",
                          usage={"prompt_tokens": p, "completion_tokens": c, "cost_usd": cost},
                          retries=retries, latency_s=time.perf_counter() - t0, rate_limited=rate_limited)
