"""Parse K2 assistant output into reasoning, content and OpenAI-style tool calls, in one go or streaming.

    [<think>]{reasoning}</think>{content}<|tool_calls_section_begin|>
      <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{JSON object}<|tool_call_end|> ...
    <|tool_calls_section_end|>[<|im_end|>]

Output starts in the reasoning when it opens with `<think>` (after any whitespace) or when the prompt already
opened it (`in_reasoning=True`: K2.6's thinking-mode generation prompt ends with `<think>`). A tool-calls section
that begins inside the reasoning ends it: the calls are parsed as calls, not left in the reasoning. Call ids may
be `functions.NAME:IDX`, `NAME:IDX`, or a bare counter `IDX` whose function is inferred from the offered tools
(the only one, or the only one whose parameters fit the arguments), as vLLM's kimi_k2 parser accepts them;
whitespace around the id and the arguments is dropped.

One state machine serves both modes: `StreamingParser.feed(piece)` returns delta events as soon as they are
certain (a piece that may be the start of a marker, or trailing whitespace of arguments, is held back), and
`parse(text)` is `feed(text)` + `finish()` folded into a `ParsedMessage`. Malformed output never raises: the
parser keeps the content it can recover, drops the calls it cannot parse (invalid JSON, a malformed id, a call
left open) and says why in `errors`, so a server can answer with a clear error. Events (dicts, by "type"):
    {"type": "reasoning", "text"}            reasoning delta (an empty one when the reasoning opens)
    {"type": "content", "text"}              content delta
    {"type": "tool_call", "index", "id", "name"}   once per call, when its id (and name) is known
    {"type": "arguments", "index", "text"}   argument delta of call `index`
    {"type": "error", "index", "message"}    `index` is the call it invalidates, or None
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

THINK_BEGIN, THINK_END = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
IM_END = "<|im_end|>"
_SECTION_MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END, IM_END)
MARKERS = {  # markers that mean something in each state; anything else is text
    "reasoning": (THINK_END, SECTION_BEGIN, CALL_BEGIN, IM_END),
    "content": (SECTION_BEGIN, CALL_BEGIN, IM_END),
    "section": _SECTION_MARKERS, "call_id": _SECTION_MARKERS, "arguments": _SECTION_MARKERS,
}
_FIND = {state: re.compile("|".join(map(re.escape, ms))) for state, ms in MARKERS.items()}
_CALL_ID = re.compile(r"(?:functions\.)?(?P<name>[^\s:]+):\d+|\d+")
_SPACE = " \t\r\n"


@dataclass
class ParsedMessage:
    content: str = ""
    reasoning_content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_message(self) -> dict:
        """The OpenAI-style assistant message (content null when empty and there are tool calls)."""
        msg = {"role": "assistant", "content": self.content or (None if self.tool_calls else "")}
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


class StreamingParser:
    """Feed decoded text piece by piece; each `feed` returns the delta events it made certain. `tools` (the
    request's OpenAI tool list) lets a bare-counter id name its function; `in_reasoning` says the prompt ended
    with `<think>`."""

    def __init__(self, tools: list[dict] | None = None, in_reasoning: bool = False):
        self.state = "start"
        self._in_reasoning = in_reasoning
        self._tools = [t["function"] for t in tools or []
                       if isinstance(t, dict) and isinstance(t.get("function"), dict)]
        self._name: str | None = None  # the current call's function name; None: inferred when it ends
        self._held = ""         # trailing whitespace of the arguments, emitted only if more text follows
        self._buf = ""
        self._events: list[dict] = []
        self._stray = ""        # non-call text inside a section
        self._id = ""           # the current call's id text
        self._args = ""         # the current call's argument text
        self._index: int | None = None  # stream index of the current call, None if it is already rejected
        self._n_calls = 0

    def feed(self, piece: str) -> list[dict]:
        self._buf += piece
        self._run(final=False)
        return self._take()

    def finish(self) -> list[dict]:
        """End of output: flush held-back text and report whatever is left open."""
        self._run(final=True)
        if self.state == "reasoning":
            self._error(None, "unclosed <think>: the output ended inside the reasoning")
        elif self.state in ("section", "call_id", "arguments"):
            self._report_stray()
            self._unclosed_call("the output ended")
            self._error(None, "unclosed tool-calls section: the output ended before <|tool_calls_section_end|>")
        self.state = "done"
        return self._take()

    # ---- the state machine ----
    def _run(self, final: bool) -> None:
        while self._buf and self.state != "done":
            if self.state == "start":
                head = self._buf.lstrip(_SPACE)
                if head.startswith(THINK_BEGIN):
                    self._buf = head[len(THINK_BEGIN):]
                elif THINK_BEGIN.startswith(head) and not final:
                    return
                elif not self._in_reasoning:
                    self.state = "content"
                    continue
                self.state = "reasoning"
                self._emit({"type": "reasoning", "text": ""})
                continue
            m = _FIND[self.state].search(self._buf)
            if m:
                self._text(self._buf[:m.start()])
                self._buf = self._buf[m.end():]
                self._marker(m.group())
                continue
            hold = 0 if final else _partial_marker_len(self._buf, MARKERS[self.state])
            self._text(self._buf[:len(self._buf) - hold])
            self._buf = self._buf[len(self._buf) - hold:]
            return

    def _text(self, text: str) -> None:
        if not text:
            return
        if self.state == "reasoning":
            self._emit({"type": "reasoning", "text": text})
        elif self.state == "content":
            self._emit({"type": "content", "text": text})
        elif self.state == "section":
            self._stray += text
        elif self.state == "call_id":
            self._id += text
        elif self.state == "arguments":
            if not self._args:
                text = text.lstrip(_SPACE)
            self._args += text
            if self._index is not None and self._name is not None:
                body = (self._held + text).rstrip(_SPACE)
                self._held = (self._held + text)[len(body):]
                if body:
                    self._emit({"type": "arguments", "index": self._index, "text": body})

    def _marker(self, mk: str) -> None:
        s = self.state
        if s == "reasoning":  # a tool-calls section (or call) ends the reasoning and is parsed as usual
            if mk == IM_END:
                self._error(None, "unclosed <think>: <|im_end|> came inside the reasoning")
            self.state = {THINK_END: "content", SECTION_BEGIN: "section", IM_END: "done"}.get(mk, "content")
            if mk != CALL_BEGIN:
                return
            s = "content"
        if s == "content":
            if mk == CALL_BEGIN:
                self._error(None, "<|tool_call_begin|> outside a tool-calls section (section opened implicitly)")
                self._open_call()
            else:
                self.state = "section" if mk == SECTION_BEGIN else "done"
            return
        self._report_stray()
        if mk == SECTION_BEGIN:
            self._error(None, "nested <|tool_calls_section_begin|> ignored")
        elif mk == ARG_BEGIN:
            if s == "call_id":
                self._start_arguments()
            else:
                where = f" in tool call {self._id.strip()!r}; call dropped" if s == "arguments" else " ignored"
                self._error(self._streamed() if s == "arguments" else None,
                            "stray <|tool_call_argument_begin|>" + where)
                self._index = None  # a dropped call streams no more deltas
        elif mk == CALL_END:
            if s == "arguments":
                self._close_call()
            elif s == "call_id":
                self._error(None, f"tool call {self._id.strip()!r} has no <|tool_call_argument_begin|>; dropped")
                self.state = "section"
            else:
                self._error(None, "stray <|tool_call_end|> ignored")
        elif mk == CALL_BEGIN:
            if s != "section":
                self._unclosed_call("the next <|tool_call_begin|> came")
            self._open_call()
        elif mk in (SECTION_END, IM_END):
            if s != "section":
                self._unclosed_call(f"{mk} came")
            if mk == IM_END:
                self._error(None, "unclosed tool-calls section: <|im_end|> came before <|tool_calls_section_end|>")
            self.state = "content" if mk == SECTION_END else "done"

    def _report_stray(self) -> None:
        if self._stray.strip():
            self._error(None, f"text outside any call in the tool-calls section dropped: {self._stray.strip()!r:.60}")
        self._stray = ""

    def _streamed(self) -> int | None:
        """The index of the current call if its tool_call event went out (so an error must invalidate it)."""
        return self._index if self._name is not None else None

    def _open_call(self) -> None:
        self.state, self._id, self._args, self._index, self._held = "call_id", "", "", None, ""

    def _start_arguments(self) -> None:
        cid = self._id.strip(_SPACE)
        m = _CALL_ID.fullmatch(cid)
        self.state = "arguments"
        if not m:
            self._error(None, f"malformed tool call id {cid!r} (expected functions.NAME:INDEX); call dropped")
            return
        self._name = m["name"] or (self._tools[0].get("name") if len(self._tools) == 1 else None)
        if self._name is None and not self._tools:
            self._error(None, f"tool call id {cid!r} names no function and no tools were offered; call dropped")
            return
        self._index = self._n_calls  # a bare counter among several tools is named (and numbered) when it ends
        if self._name is not None:
            self._n_calls += 1
            self._emit({"type": "tool_call", "index": self._index, "id": cid, "name": self._name})

    def _close_call(self) -> None:
        if self._index is not None and self._name is None:
            self._name = _fitting_tool(self._tools, self._args)
            if self._name is None:
                self._error(None, f"tool call {self._id.strip(_SPACE)!r} names no function and its arguments fit "
                                  "no single offered tool; call dropped")
                self.state = "section"
                return
            self._n_calls += 1
            self._emit({"type": "tool_call", "index": self._index, "id": self._id.strip(_SPACE), "name": self._name})
            if self._args.rstrip(_SPACE):
                self._emit({"type": "arguments", "index": self._index, "text": self._args.rstrip(_SPACE)})
        if self._index is not None:
            try:
                ok = isinstance(json.loads(self._args), dict)
                why = "is not a JSON object"
            except ValueError as e:
                ok, why = False, f"is not valid JSON ({e})"
            if not ok:
                self._error(self._index, f"arguments of tool call {self._id.strip()!r} {why}; call dropped")
        self.state = "section"

    def _unclosed_call(self, why: str) -> None:
        if self.state == "call_id":
            self._error(None, f"tool call {self._id.strip()!r} unclosed: {why} before its arguments; dropped")
        elif self.state == "arguments" and self._index is not None:
            self._error(self._streamed(),
                        f"tool call {self._id.strip()!r} unclosed: {why} before <|tool_call_end|>; dropped")

    def _emit(self, event: dict) -> None:
        self._events.append(event)

    def _error(self, index: int | None, message: str) -> None:
        self._emit({"type": "error", "index": index, "message": message})

    def _take(self) -> list[dict]:
        out, self._events = self._events, []
        return out


def _fitting_tool(tools: list[dict], args: str) -> str | None:
    """The one offered function whose parameters fit `args` (a JSON object): every key a property, every
    required property present. None when no tool or several fit."""
    try:
        obj = json.loads(args)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    keys = set(obj)
    fits = []
    for fn in tools:
        params = fn.get("parameters") or {}
        props, required = set(params.get("properties") or {}), set(params.get("required") or [])
        if keys <= props and required <= keys:
            fits.append(fn.get("name"))
    return fits[0] if len(fits) == 1 else None


def _partial_marker_len(buf: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of a marker (to hold back)."""
    for k in range(min(len(buf), max(map(len, markers)) - 1), 0, -1):
        tail = buf[-k:]
        if any(mk.startswith(tail) for mk in markers):
            return k
    return 0


def collect(events: list[dict]) -> ParsedMessage:
    """Fold delta events into a message; calls invalidated by an error event are left out."""
    out = ParsedMessage()
    calls: dict[int, dict] = {}
    failed: set[int] = set()
    content, reasoning = [], None
    for ev in events:
        kind = ev["type"]
        if kind == "content":
            content.append(ev["text"])
        elif kind == "reasoning":
            reasoning = (reasoning or []) + [ev["text"]]
        elif kind == "tool_call":
            calls[ev["index"]] = {"id": ev["id"], "type": "function", "function": {"name": ev["name"], "arguments": ""}}
        elif kind == "arguments":
            calls[ev["index"]]["function"]["arguments"] += ev["text"]
        elif kind == "error":
            out.errors.append(ev["message"])
            if ev["index"] is not None:
                failed.add(ev["index"])
    out.content = "".join(content)
    out.reasoning_content = None if reasoning is None else "".join(reasoning)
    out.tool_calls = [c for i, c in sorted(calls.items()) if i not in failed]
    return out


def parse(text: str, tools: list[dict] | None = None, in_reasoning: bool = False) -> ParsedMessage:
    """Parse a complete assistant output (decoded with special tokens kept); arguments as in StreamingParser."""
    p = StreamingParser(tools, in_reasoning)
    return collect(p.feed(text) + p.finish())
