"""POST /v1/responses: OpenAI's Responses API (what the OpenAI Agents SDK and inspect-ai call by default).

Input items (messages, function_call, function_call_output, reasoning) and `instructions` become a chat
conversation for the K2 template: `instructions` is the system turn, a reasoning item is the
`reasoning_content` of the assistant turn that follows it, function calls join the assistant turn before them,
and outputs are tool turns. The model's output is parsed as in chat completions and returned as output items:
reasoning (`content` = reasoning_text), message (output_text) and function_call, in the order they came. Streaming
sends OpenAI's typed events in its order: response.created, response.in_progress, then per item
output_item.added, (content_part.added, output_text.delta..., output_text.done, content_part.done |
reasoning_text.delta..., reasoning_text.done | function_call_arguments.delta, function_call_arguments.done),
output_item.done, and finally response.completed (response.incomplete at max_output_tokens, response.failed on
an engine failure). A tool call is sent once it is complete and valid (the parser may still drop it until then).
Nothing is stored (`store` must be false or unset), so `previous_response_id` is not accepted; for stateless
multi-turn use, `include: ["reasoning.encrypted_content"]` returns each reasoning item's text in
`encrypted_content` as an opaque token that the server reads back when it comes in as input. It is base64, not
encrypted: the server holds no secret, and the client already has the same text in `content`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from k2lab.data.images import image_urls
from k2lab.serve.protocol import APIError, InputMessage, ResponsesRequest
from k2lab.serve.streaming import finish_reason, sse
from k2lab.tokenizer.toolcalls import StreamingParser

if TYPE_CHECKING:
    from k2lab.serve.server import Server

log = logging.getLogger(__name__)


def _content(content) -> str | list[dict]:
    """Responses content parts -> chat content (a plain string unless there are images)."""
    if isinstance(content, str):
        return content
    if all(p.type != "input_image" for p in content):
        return "".join(p.text for p in content)
    return [{"type": "image_url", "image_url": {"url": p.image_url}} if p.type == "input_image" else
            {"type": "text", "text": p.text} for p in content]


def to_messages(body: ResponsesRequest) -> list[dict]:
    messages = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
    items = [InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    reasoning = None  # a reasoning item's text, waiting for the assistant turn it belongs to
    for k, item in enumerate(items):
        if reasoning is not None and item.type not in ("message", "function_call"):
            raise APIError(400, f"input[{k - 1}] is a reasoning item not followed by the assistant message or "
                                "function_call it belongs to", param="input")
        if item.type == "reasoning":
            reasoning = "".join(p.text for p in (item.content or item.summary)) if item.content or item.summary \
                else _opaque_text(item.encrypted_content or "", k)
        elif item.type == "message":
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": _content(item.content)})
            if reasoning is not None:
                if role != "assistant":
                    raise APIError(400, f"input[{k - 1}]: a reasoning item must precede an assistant turn",
                                   param="input")
                messages[-1]["reasoning_content"], reasoning = reasoning, None
        elif item.type == "function_call":
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if reasoning is None and messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)  # same assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call],
                                 **({"reasoning_content": reasoning} if reasoning is not None else {})})
                reasoning = None
        else:
            output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    if reasoning is not None:
        raise APIError(400, "the last input item is a reasoning item with no turn after it", param="input")
    return messages


def _opaque_text(token: str, k: int) -> str:
    try:
        return base64.b64decode(token.encode(), validate=True).decode()
    except ValueError:
        raise APIError(400, f"input[{k}].encrypted_content was not made by this server", param="input") from None


class OutputItems:
    """Tool-call parser events -> Responses output items, and the stream events that build them."""

    def __init__(self, with_tools: bool, opaque_reasoning: bool):
        self.items: list[dict] = []
        self.with_tools, self.opaque_reasoning = with_tools, opaque_reasoning
        self.seq = 0
        self.open: dict | None = None     # the reasoning or message item being written
        self.call: dict | None = None     # a function call being read (sent once complete and valid)

    def event(self, kind: str, **fields) -> str:
        self.seq += 1
        return sse({"type": kind, "sequence_number": self.seq - 1, **fields}, event=kind)

    def feed(self, events: list[dict]) -> list[str]:
        out = []
        for ev in events:
            kind = ev["type"]
            if kind in ("reasoning", "content") and ev["text"]:
                out += self._flush_call()
                out += self._text("reasoning" if kind == "reasoning" else "message", ev["text"])
            elif kind == "tool_call" and self.with_tools:
                out += self._flush_call() + self._close()
                self.call = {"index": ev["index"], "call_id": ev["id"], "name": ev["name"], "arguments": ""}
            elif kind == "arguments" and self.call is not None and self.call["index"] == ev["index"]:
                self.call["arguments"] += ev["text"]
            elif kind == "error":
                log.warning("model output: %s", ev["message"])
                if self.call is not None and self.call["index"] == ev["index"]:
                    self.call = None  # the parser dropped this call
        return out

    def finish(self) -> list[str]:
        return self._flush_call() + self._close()

    def _text(self, kind: str, text: str) -> list[str]:
        out = []
        if self.open is None or self.open["type"] != kind:
            out += self._close()
            if kind == "reasoning":
                self.open = {"id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "summary": [],
                             "content": [], "status": "in_progress"}
            else:
                self.open = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                             "content": [], "status": "in_progress"}
            out.append(self.event("response.output_item.added", output_index=len(self.items), item=dict(self.open)))
            self.open["text"] = ""
            if kind == "message":
                out.append(self.event("response.content_part.added", **self._where(), part=_part("")))
        self.open["text"] += text
        delta = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        out.append(self.event(delta, **self._where(), delta=text, **({} if kind == "reasoning" else {"logprobs": []})))
        return out

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.items), "content_index": 0}

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        item, where = self.open, self._where()
        text = item.pop("text")
        if item["type"] == "reasoning":
            out = [self.event("response.reasoning_text.done", **where, text=text)]
            item["content"] = [{"type": "reasoning_text", "text": text}]
            if self.opaque_reasoning:
                item["encrypted_content"] = base64.b64encode(text.encode()).decode()
        else:
            out = [self.event("response.output_text.done", **where, text=text, logprobs=[]),
                   self.event("response.content_part.done", **where, part=_part(text))]
            item["content"] = [_part(text)]
        item["status"] = "completed"
        out.append(self.event("response.output_item.done", output_index=len(self.items), item=item))
        self.items.append(item)
        self.open = None
        return out

    def _flush_call(self) -> list[str]:
        if self.call is None:
            return []
        call, self.call = self.call, None
        item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "call_id": call["call_id"],
                "name": call["name"], "arguments": "", "status": "in_progress"}
        index = len(self.items)
        out = [self.event("response.output_item.added", output_index=index, item=dict(item)),
               self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=call["arguments"]),
               self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          name=call["name"], arguments=call["arguments"])]
        item.update(arguments=call["arguments"], status="completed")
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        return out


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def register(app: FastAPI, server: Server, authorized) -> None:
    @app.post("/v1/responses", dependencies=[Depends(authorized)])
    async def responses(body: ResponsesRequest, http: Request):
        server.check(body.model)
        if body.user:
            log.info("response for user %r", body.user)
        choice = body.tool_choice or ("auto" if body.tools else "none")
        tools = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                 for t in body.tools] if body.tools and choice != "none" else None
        if choice not in ("none", "auto") and not tools:
            raise APIError(400, "tool_choice requires tools", param="tool_choice")
        named = None if isinstance(choice, str) else {"function": {"name": choice.name}}
        if named and choice.name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names `{choice.name}`, which is not among the tools", param="tool_choice")
        messages = to_messages(body)
        # K2.6 thinks or not (no graded effort): effort "none" is the template's thinking=False; a chat format
        # without that option never thinks, so "none" already holds there
        off = body.reasoning and body.reasoning.effort == "none" and "thinking" in server.template_options()
        template = {"thinking": False} if off else None
        ids = server.chat_ids(messages, tools, template)
        thinking = server.opens_thinking(ids)
        embeds = None
        if image_urls(messages):
            ids, embeds = await asyncio.to_thread(server.media, messages, ids)
        params = server.params(len(ids), body.max_output_tokens, temperature=body.temperature, top_p=body.top_p)
        fmt = body.text.format if body.text else None
        schema = None
        if fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise APIError(400, "text.format json_schema needs a schema", param="text.format")
            schema = fmt.schema_
        elif fmt is not None and fmt.type == "json_object":
            schema = {"type": "object"}
        constraint = server.constraint(schema, tools, named or choice, body.parallel_tool_calls, thinking,
                                       param="text.format")
        gen = server.submit(ids, params, [constraint] if constraint else None, embeds)
        req = gen.reqs[0]
        think_end = server.tokenizer.special_tokens.get("</think>")
        base = {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
                "model": server.model_name, "error": None, "incomplete_details": None,
                "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
                "parallel_tool_calls": body.parallel_tool_calls, "temperature": body.temperature, "top_p": body.top_p,
                "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
                "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
                "text": {"format": fmt.model_dump(exclude_none=True, by_alias=True) if fmt else {"type": "text"}},
                "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
                "store": False, "truncation": "disabled", "metadata": body.metadata or {}, "user": body.user,
                "status": "in_progress", "output": [], "usage": None}

        def final(items: OutputItems) -> dict:
            reason = finish_reason(req.finish_reason, False)  # raises on abort / engine error
            out = req.output
            reasoning_tokens = out.index(think_end) + 1 if think_end in out else (len(out) if thinking else 0)
            usage = gen.usage()
            return {**base, "status": "incomplete" if reason == "length" else "completed", "output": items.items,
                    "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
                    "usage": {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": usage["completion_tokens"],
                              "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                              "total_tokens": usage["total_tokens"]}}

        def start() -> tuple[StreamingParser, OutputItems]:
            parser = StreamingParser(tools=tools, in_reasoning=thinking)
            items = OutputItems(tools is not None, "reasoning.encrypted_content" in (body.include or []))
            return parser, items

        if not body.stream:
            await gen.collect(http)
            parser, items = start()
            items.feed(parser.feed(req.text) + parser.finish())
            items.finish()
            return final(items)

        async def stream() -> AsyncIterator[str]:
            parser, items = start()
            yield items.event("response.created", response=base)
            yield items.event("response.in_progress", response=base)
            async for _, e in gen.events():
                for line in items.feed(parser.feed(e.text) + (parser.finish() if e.finish_reason else [])):
                    yield line
            for line in items.finish():
                yield line
            try:
                done = final(items)
            except APIError as err:
                yield items.event("response.failed", response={**base, "status": "failed", "output": items.items,
                                                               "error": {"code": err.code, "message": err.message}})
                return
            yield items.event("response.completed" if done["status"] == "completed" else "response.incomplete",
                              response=done)

        return StreamingResponse(stream(), media_type="text/event-stream")
