"""Format checks every kept trajectory must pass: it renders in the K2 chat format and every assistant turn
parses back to the same message, and every tool call's arguments validate against the tool's JSON schema."""

from __future__ import annotations

import json
import re

import jsonschema

from k2lab.tokenizer.chat import render
from k2lab.tokenizer.toolcalls import parse

_ASSISTANT_TURN = re.compile(r"<\|im_assistant\|>[^<]*<\|im_middle\|>(.*?)<\|im_end\|>", re.S)


def _calls(message: dict) -> list[tuple[str, object]]:
    out = []
    for tc in message.get("tool_calls") or []:
        args = tc["function"]["arguments"]
        try:
            out.append((tc["function"]["name"], json.loads(args) if isinstance(args, str) else args))
        except json.JSONDecodeError:
            out.append((tc["function"]["name"], args))
    return out


def roundtrip_errors(messages: list[dict], tools: list[dict] | None) -> list[str]:
    """Why the conversation does not survive render -> parse ([] when every assistant turn comes back equal)."""
    try:
        text = render(messages, tools or None)
    except ValueError as e:
        return [f"does not render: {e}"]
    bodies = _ASSISTANT_TURN.findall(text)
    sent = [m for m in messages if m["role"] == "assistant"]
    if len(bodies) != len(sent):
        return [f"rendered {len(bodies)} assistant turns for {len(sent)} assistant messages"]
    errors = []
    for i, (body, m) in enumerate(zip(bodies, sent)):
        back = parse(body)
        if back.errors:
            errors.append(f"assistant turn {i}: parser errors {back.errors}")
        if (back.content or "") != (m.get("content") or ""):
            errors.append(f"assistant turn {i}: content {back.content[:60]!r} != {(m.get('content') or '')[:60]!r}")
        # K2.6 drops the reasoning of turns before the last final answer by design: only what is rendered must agree
        if back.reasoning_content and back.reasoning_content != m.get("reasoning_content"):
            errors.append(f"assistant turn {i}: reasoning differs after the round trip")
        if _calls(back.to_message()) != _calls(m):
            errors.append(f"assistant turn {i}: tool calls {_calls(back.to_message())} != {_calls(m)}")
    return errors


def schema_errors(messages: list[dict], tools: list[dict] | None) -> list[str]:
    """Tool calls that name no declared tool or whose arguments break the tool's schema."""
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools or []}
    errors = []
    for m in messages:
        for tc in m.get("tool_calls") or []:
            name, raw = tc["function"]["name"], tc["function"]["arguments"]
            if name not in schemas:
                errors.append(f"call to undeclared tool {name!r}")
                continue
            try:
                args = json.loads(raw) if isinstance(raw, str) else raw
            except json.JSONDecodeError as e:
                errors.append(f"{name}: arguments are not JSON ({e.msg})")
                continue
            errors += [f"{name}: {e.message}" for e in jsonschema.Draft202012Validator(schemas[name]).iter_errors(args)]
    return errors


def k2_ids(message: dict, history: list[dict]) -> dict:
    """Tool-call ids in K2's form, functions.NAME:INDEX with INDEX counted over the conversation (what the chat
    format renders and the parser reads back); other endpoints' ids (call_abc...) would not survive a round trip."""
    start = sum(len(m.get("tool_calls") or []) for m in history)
    calls = [tc | {"id": f"functions.{tc['function']['name']}:{start + i}"}
             for i, tc in enumerate(message.get("tool_calls") or [])]
    return message | {"tool_calls": calls} if calls else message
