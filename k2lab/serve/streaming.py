"""What every endpoint shares once a request is in the engine: its choices' events as one stream, the whole
result for a non-streaming client (cancelled if that client goes away), Server-Sent Events, finish reasons."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from fastapi import Request as HTTPRequest

from k2lab.serve.engine import Event, Request
from k2lab.serve.protocol import APIError


class Generation:
    """The engine requests of one API request (one per choice, `n` of them) and their events, in arrival order,
    as (choice index, Event) on one queue."""

    def __init__(self, reqs: list[Request], queue: asyncio.Queue, prompt_len: int):
        self.reqs, self.queue, self.prompt_len = reqs, queue, prompt_len

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every event until each choice has finished; leaving early (client gone) cancels the rest."""
        open_ = len(self.reqs)
        try:
            while open_:
                i, e = await self.queue.get()
                open_ -= e.finish_reason is not None
                yield i, e
        finally:
            self.cancel()  # no-op for finished requests; frees the slots of the others at the next engine step

    async def collect(self, http: HTTPRequest) -> list[list[Event]]:
        """Each choice's events, whole. A client that disconnects first cancels the generation: the watcher
        reads the connection (the body is already read, so the next message is the disconnect)."""
        async def watch() -> None:
            while (await http.receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        watcher = asyncio.create_task(watch())
        out: list[list[Event]] = [[] for _ in self.reqs]
        try:
            async for i, e in self.events():
                out[i].append(e)
        finally:
            watcher.cancel()
        return out

    def cancel(self) -> None:
        for req in self.reqs:
            req.cancel()

    def usage(self) -> dict:
        completion = sum(len(r.output) for r in self.reqs)
        return {"prompt_tokens": self.prompt_len, "completion_tokens": completion,
                "total_tokens": self.prompt_len + completion}


def finish_reason(engine_reason: str, has_calls: bool) -> str:
    """The OpenAI finish_reason of an engine finish; an engine failure or abort is an APIError."""
    if engine_reason == "error":
        raise APIError(500, "the engine failed on this request", "engine_error")
    if engine_reason == "abort":
        raise APIError(503, "the request was aborted (client gone or server shutting down)", "service_unavailable")
    return "length" if engine_reason == "length" else ("tool_calls" if has_calls else "stop")


def sse(obj: dict | str, event: str | None = None) -> str:
    """One Server-Sent Event (`event:` named for the Responses API's typed events)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"
