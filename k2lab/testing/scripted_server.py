"""A scripted OpenAI-compatible chat-completions server on loopback: a TEST DOUBLE, not a model.

It is a real HTTP server (Starlette + uvicorn in a background thread, on a free 127.0.0.1 port) so the agent
code under test goes through the real `openai` client, HTTP, JSON and SSE. What it answers is decided by a
Python `handler(request) -> reply` written by the test: it plays back scripted decisions per agent (the agent is
usually recognised by its system prompt). Optional fixed latency and injected faults (429, 500, timeouts)
exercise retries and backoff.

    def handler(req: ScriptedRequest) -> dict:
        if req.step == 0:
            return {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}
        return {"content": "3"}

    with ScriptedServer(handler, latency=0.05) as srv:
        llm = LLM(base_url=srv.base_url, api_key="test", model="scripted")

A reply is a dict with `content` (str or None), `tool_calls` (list of {"name", "arguments": dict or JSON str,
optional "id"}), optional `reasoning_content`, optional `finish_reason`, optional `usage`
({"prompt_tokens", "completion_tokens"}; default: characters / 4).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

FAULT_KINDS = ("429", "500", "timeout")


@dataclass
class ScriptedRequest:
    """One chat-completions request as the handler sees it."""

    body: dict
    index: int  # 0-based arrival order at the server

    @property
    def messages(self) -> list[dict]:
        return self.body.get("messages", [])

    @property
    def system(self) -> str:
        """Content of the first system message ('' if none): the usual way to tell agents apart."""
        for m in self.messages:
            if m.get("role") == "system":
                return _text(m.get("content"))
        return ""

    @property
    def step(self) -> int:
        """Number of assistant turns already in the conversation (0 on the agent's first call)."""
        return sum(1 for m in self.messages if m.get("role") == "assistant")

    @property
    def user(self) -> str:
        """Content of the first user message."""
        for m in self.messages:
            if m.get("role") == "user":
                return _text(m.get("content"))
        return ""

    @property
    def tool_results(self) -> list[dict]:
        """Tool messages after the last assistant turn (the results of the agent's previous tool calls)."""
        out: list[dict] = []
        for m in reversed(self.messages):
            if m.get("role") != "tool":
                break
            out.append(m)
        return out[::-1]

    @property
    def tools(self) -> list[str]:
        return [t["function"]["name"] for t in self.body.get("tools") or []]


@dataclass
class Faults:
    """Inject a fault into a fraction `rate` of requests, kind drawn uniformly from `kinds` (seeded).

    "timeout" holds the request `hang_s` seconds before answering, so a client with a shorter timeout gives up.
    """

    rate: float
    kinds: tuple[str, ...] = FAULT_KINDS
    hang_s: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in FAULT_KINDS]
        if bad or not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"Faults: rate must be in [0, 1] and kinds in {FAULT_KINDS}, got {self.rate}, {bad}")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self) -> str | None:
        with self._lock:
            return self._rng.choice(self.kinds) if self._rng.random() < self.rate else None


@dataclass
class ServerStats:
    requests: int = 0
    answered: int = 0
    faults: dict[str, int] = field(default_factory=lambda: {k: 0 for k in FAULT_KINDS})
    inflight: int = 0
    max_inflight: int = 0


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _completion(reply: dict, body: dict) -> dict:
    """Turn a handler reply into an OpenAI chat.completion object."""
    tool_calls = [
        {"id": tc.get("id") or f"call_{uuid.uuid4().hex[:12]}", "type": "function",
         "function": {"name": tc["name"],
                      "arguments": tc["arguments"] if isinstance(tc["arguments"], str) else json.dumps(tc["arguments"])}}
        for tc in reply.get("tool_calls") or []
    ]
    message: dict[str, Any] = {"role": "assistant", "content": reply.get("content")}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reply.get("reasoning_content") is not None:
        message["reasoning_content"] = reply["reasoning_content"]
    usage = reply.get("usage") or {
        "prompt_tokens": _tokens(json.dumps(body.get("messages", []))),
        "completion_tokens": _tokens(json.dumps(message)),
    }
    usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    finish = reply.get("finish_reason") or ("tool_calls" if tool_calls else "stop")
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "scripted"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage}


def _sse_chunks(completion: dict, include_usage: bool) -> list[dict]:
    """Split a completion into chat.completion.chunk objects: role, reasoning, content pieces, tool calls, finish."""
    base = {k: completion[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = completion["choices"][0]
    msg = choice["message"]

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    out = [chunk({"role": "assistant", "content": ""})]
    if msg.get("reasoning_content"):
        out.append(chunk({"reasoning_content": msg["reasoning_content"]}))
    content = msg.get("content") or ""
    for i in range(0, len(content), 16):
        out.append(chunk({"content": content[i:i + 16]}))
    for idx, tc in enumerate(msg.get("tool_calls") or []):
        out.append(chunk({"tool_calls": [{"index": idx, "id": tc["id"], "type": "function",
                                          "function": {"name": tc["function"]["name"], "arguments": ""}}]}))
        args = tc["function"]["arguments"]
        for i in range(0, len(args), 16):
            out.append(chunk({"tool_calls": [{"index": idx, "function": {"arguments": args[i:i + 16]}}]}))
    out.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        out.append(base | {"choices": [], "usage": completion["usage"]})
    return out


class ScriptedServer:
    """Background-thread HTTP server; use as a context manager. `base_url` ends in /v1."""

    def __init__(self, handler: Callable[[ScriptedRequest], dict], latency: float = 0.0,
                 faults: Faults | None = None, models: tuple[str, ...] = ("scripted",)):
        self.handler, self.latency, self.faults, self.models = handler, latency, faults, models
        self.stats = ServerStats()
        self._lock = threading.Lock()
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                Route("/v1/models", self._models, methods=["GET"])])
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        # loop="asyncio": never let uvicorn install uvloop as the process-wide policy from this thread
        config = uvicorn.Config(app, log_level="error", access_log=False, lifespan="off", loop="asyncio",
                                timeout_keep_alive=30, backlog=4096)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="scripted-server", daemon=True)

    def start(self) -> "ScriptedServer":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("ScriptedServer failed to start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> "ScriptedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "k2lab"}
                                                        for m in self.models]})

    async def _chat(self, request: Request):
        body = await request.json()
        with self._lock:
            index = self.stats.requests
            self.stats.requests += 1
            self.stats.inflight += 1
            self.stats.max_inflight = max(self.stats.max_inflight, self.stats.inflight)
        try:
            fault = self.faults.draw() if self.faults else None
            if fault:
                with self._lock:
                    self.stats.faults[fault] += 1
            if fault == "429":
                return JSONResponse({"error": {"message": "rate limited (injected)", "type": "rate_limit"}},
                                    status_code=429, headers={"retry-after-ms": "10"})
            if fault == "500":
                return JSONResponse({"error": {"message": "server error (injected)", "type": "server_error"}},
                                    status_code=500)
            if fault == "timeout":
                await asyncio.sleep(self.faults.hang_s)
            if self.latency:
                await asyncio.sleep(self.latency)
            try:
                reply = self.handler(ScriptedRequest(body, index))
            except Exception as e:  # a broken script is the test's bug: answer 400 with the reason
                return JSONResponse({"error": {"message": f"handler error: {e!r}", "type": "invalid_request"}},
                                    status_code=400)
            completion = _completion(reply, body)
            with self._lock:
                self.stats.answered += 1
            if not body.get("stream"):
                return JSONResponse(completion)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = _sse_chunks(completion, include_usage)

            async def events():
                for c in chunks:
                    yield f"data: {json.dumps(c)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        finally:
            with self._lock:
                self.stats.inflight -= 1
