"""POST /v1/chat/completions and POST /v1/completions: whole or streamed (Server-Sent Events), n choices each.

Chat output is split by the K2 tool-call parser into content, `reasoning_content` (vLLM's field, also streamed
as `delta.reasoning_content`) and OpenAI tool_calls. When the prompt ends inside `<think>` (K2.6 thinking mode)
the output starts as reasoning, and the parser is told so (`in_reasoning`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from k2lab.data.images import image_urls
from k2lab.serve.engine import Event
from k2lab.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, NamedToolChoice
from k2lab.serve.streaming import finish_reason, sse
from k2lab.tokenizer.toolcalls import StreamingParser, parse

if TYPE_CHECKING:
    from k2lab.serve.server import Server

log = logging.getLogger(__name__)
SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "presence_penalty",
            "frequency_penalty", "logit_bias")


def register(app: FastAPI, server: Server, authorized) -> None:
    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        server.check(body.model)
        if body.user:
            log.info("chat completion for user %r", body.user)
        choice = body.tool_choice or ("auto" if body.tools else "none")
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and choice != "none" else None
        names = {t["function"]["name"] for t in tools or []}
        if choice != "none" and choice != "auto" and not tools:
            raise APIError(400, "tool_choice requires tools", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(400, f"tool_choice names `{choice.function.name}`, which is not among the tools",
                           param="tool_choice")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        for m in messages:
            m["role"] = "system" if m["role"] == "developer" else m["role"]
        ids = server.chat_ids(messages, tools, body.chat_template_kwargs)
        thinking = server.opens_thinking(ids)
        embeds = None
        if image_urls(messages):
            ids, embeds = await asyncio.to_thread(server.media, messages, ids)
        n_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = server.params(len(ids), body.max_completion_tokens or body.max_tokens, n_logprobs,
                               **{f: getattr(body, f) for f in SAMPLING})
        fmt = body.response_format
        schema = None
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "response_format json_schema needs a json_schema", param="response_format")
            schema = fmt.json_schema.schema_
        elif fmt is not None and fmt.type == "json_object":
            schema = {"type": "object"}
        named = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
        constraints = [server.constraint(schema, tools, named, body.parallel_tool_calls, thinking)
                       for _ in range(body.n)]
        gen = server.submit(ids, params, constraints if constraints[0] is not None else None, embeds, body.n)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}

        def lp(e: Event) -> dict:
            return server.logprob_entry(e.token, e.logprob, e.top_logprobs)

        if not body.stream:
            out = []
            for i, (req, evs) in enumerate(zip(gen.reqs, await gen.collect(http))):
                parsed = parse(req.text, tools=tools, in_reasoning=thinking)
                for err in parsed.errors:
                    log.warning("model output: %s", err)
                message = parsed.to_message()
                if not tools:  # tool-call syntax without tools offered is not a call
                    message.pop("tool_calls", None)
                    message["content"] = parsed.content
                out.append({"index": i, "message": message,
                            "finish_reason": finish_reason(req.finish_reason, bool(tools and parsed.tool_calls)),
                            "logprobs": {"content": [lp(e) for e in evs if e.token is not None]}
                            if n_logprobs is not None else None})
            return {**head, "object": "chat.completion", "choices": out, "usage": gen.usage()}

        async def stream() -> AsyncIterator[str]:
            chunk = {**head, "object": "chat.completion.chunk"}
            parsers = [StreamingParser(tools=tools, in_reasoning=thinking) for _ in gen.reqs]
            has_calls = [False] * body.n
            for i in range(len(parsers)):
                yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}]})
            async for i, e in gen.events():
                parser = parsers[i]
                deltas = _deltas(parser.feed(e.text) + (parser.finish() if e.finish_reason else []), tools)
                has_calls[i] |= any("tool_calls" in d for d in deltas)
                logprobs = {"content": [lp(e)]} if n_logprobs is not None and e.token is not None else None
                if logprobs and not deltas:
                    deltas = [{}]
                for k, d in enumerate(deltas):
                    yield sse({**chunk, "choices": [{"index": i, "delta": d, "finish_reason": None,
                                                     **({"logprobs": logprobs} if logprobs and k == 0 else {})}]})
                if e.finish_reason is not None:
                    try:
                        reason = finish_reason(e.finish_reason, has_calls[i])
                    except APIError as err:
                        yield sse(err.body())
                        return
                    yield sse({**chunk, "choices": [{"index": i, "delta": {}, "finish_reason": reason}]})
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**chunk, "choices": [], "usage": gen.usage()})
            yield sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, http: Request):
        server.check(body.model)
        if body.user:
            log.info("completion for user %r", body.user)
        if body.echo and body.logprobs is not None:
            raise APIError(400, "`echo` with `logprobs` is not supported (prompt logprobs are not computed); "
                                "drop one of them", param="echo")
        prompt = body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = server.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        params = server.params(len(ids), body.max_tokens, body.logprobs, **{f: getattr(body, f) for f in SAMPLING})
        gen = server.submit(ids, params, n=body.n)  # checks the ids before they are decoded for echo
        echo = (prompt if isinstance(prompt, str) else server.tokenizer.decode(ids)) if body.echo else ""
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_name}

        def legacy_logprobs(evs: list[Event]) -> dict | None:
            if body.logprobs is None:
                return None
            evs = [e for e in evs if e.token is not None]
            name = (lambda t: f"token_id:{t}") if body.return_tokens_as_token_ids else server.tokenizer.id_to_piece
            return {"tokens": [name(e.token) for e in evs], "token_logprobs": [e.logprob for e in evs],
                    "top_logprobs": [{name(t): lp for t, lp in e.top_logprobs or []} for e in evs],
                    "text_offset": []}

        if not body.stream:
            done = await gen.collect(http)
            return {**head, "choices": [{"index": i, "text": echo + req.text, "logprobs": legacy_logprobs(evs),
                                         "finish_reason": finish_reason(req.finish_reason, False)}
                                        for i, (req, evs) in enumerate(zip(gen.reqs, done))],
                    "usage": gen.usage()}

        async def stream() -> AsyncIterator[str]:
            if echo:
                for i in range(body.n):
                    yield sse({**head, "choices": [{"index": i, "text": echo, "logprobs": None,
                                                    "finish_reason": None}]})
            async for i, e in gen.events():
                reason = None
                if e.finish_reason is not None:
                    try:
                        reason = finish_reason(e.finish_reason, False)
                    except APIError as err:
                        yield sse(err.body())
                        return
                yield sse({**head, "choices": [{"index": i, "text": e.text, "finish_reason": reason,
                                                "logprobs": legacy_logprobs([e]) if reason is None else None}]})
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": gen.usage()})
            yield sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")


def _deltas(events: list[dict], tools: list[dict] | None) -> list[dict]:
    """toolcalls parser events -> OpenAI chat delta objects (tool calls only when tools were offered)."""
    out = []
    for ev in events:
        kind = ev["type"]
        if kind == "content" and ev["text"]:
            out.append({"content": ev["text"]})
        elif kind == "reasoning" and ev["text"]:
            out.append({"reasoning_content": ev["text"]})
        elif kind == "tool_call" and tools:
            out.append({"tool_calls": [{"index": ev["index"], "id": ev["id"], "type": "function",
                                        "function": {"name": ev["name"], "arguments": ""}}]})
        elif kind == "arguments" and tools:
            out.append({"tool_calls": [{"index": ev["index"], "function": {"arguments": ev["text"]}}]})
        elif kind == "error":
            log.warning("model output: %s", ev["message"])
    return out
