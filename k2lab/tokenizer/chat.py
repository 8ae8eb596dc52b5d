"""The Kimi K2 chat format: OpenAI-style messages -> text, and -> token ids with an SFT loss mask.

    [<|im_system|>tool_declare<|im_middle|>{tools as compact JSON}<|im_end|>]
    [<|im_system|>system<|im_middle|>{default system prompt}<|im_end|>]   when messages[0] is not system
    <|im_{user|assistant|system}|>{name or role}<|im_middle|>{body}<|im_end|>   per message
    [<|im_assistant|>assistant<|im_middle|>]                                   generation prompt

Assistant body: `<think>{reasoning_content}</think>` (when reasoning_content is not None), the content, then
`<|tool_calls_section_begin|>` + per call `<|tool_call_begin|>{id}<|tool_call_argument_begin|>{arguments}
<|tool_call_end|>` + `<|tool_calls_section_end|>`. Tool body: `## Return of {tool_call_id}\\n{content}`.
Tool roles render under <|im_system|>. A call without an id gets `functions.{name}:{index}`.

Two choices where K2 checkpoints differ or stay silent:
- Reasoning is kept in every assistant turn (K2.6's `preserve_thinking`), so the rendering of a conversation
  extends the rendering of each of its prefixes: SFT masks and a server's prefix cache rely on that.
- In tool-call arguments `<|` is written `\\u003c|` (the same JSON value), so argument strings that look
  like markers cannot end the call early.
`render` (Python) and `CHAT_TEMPLATE` (Jinja, saved in tokenizer_config.json) produce identical strings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from k2lab.data import DatasetError
from k2lab.tokenizer.tokenizer import Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
ROLE_MARKER = {"user": "<|im_user|>", "assistant": "<|im_assistant|>", "system": "<|im_system|>",
               "tool": "<|im_system|>"}
TOOL_MARKERS = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|im_end|>")

# An image part: one <|media_pad|> that the vision stage expands to the image's merged patch count.
MEDIA = (("<|media_begin|>", True), ("image", False), ("<|media_content|>", True), ("<|media_pad|>", True),
         ("<|media_end|>", True))

CHAT_TEMPLATE = r"""{%- macro text(c) -%}
{%- if c is string -%}{{ c }}{%- elif c is not none -%}{%- for p in c -%}
{%- if p['type'] == 'image_url' -%}""" + "".join(t for t, _ in MEDIA) + r"""{%- else -%}{{ p['text'] }}{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- if tools -%}
<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- for m in messages -%}
{%- if loop.first and m['role'] != 'system' -%}
<|im_system|>system<|im_middle|>""" + DEFAULT_SYSTEM_PROMPT + r"""<|im_end|>
{%- endif -%}
{%- if m['role'] == 'user' -%}<|im_user|>
{%- elif m['role'] == 'assistant' -%}<|im_assistant|>
{%- else -%}<|im_system|>
{%- endif -%}
{{ m.get('name') or m['role'] }}<|im_middle|>
{%- if m['role'] == 'assistant' -%}
{%- if m.get('reasoning_content') is not none -%}<think>{{ m['reasoning_content'] }}</think>{%- endif -%}
{{ text(m.get('content')) }}
{%- if m.get('tool_calls') -%}<|tool_calls_section_begin|>
{%- for tc in m['tool_calls'] -%}
{%- set args = tc['function']['arguments'] -%}
{%- set args = (args if args is string else args | tojson) | replace('<|', '\\u003c|') -%}
<|tool_call_begin|>{{ tc.get('id') or 'functions.' ~ tc['function']['name'] ~ ':' ~ loop.index0 }}
{{- '<|tool_call_argument_begin|>' }}{{ args }}<|tool_call_end|>
{%- endfor -%}<|tool_calls_section_end|>
{%- endif -%}
{%- elif m['role'] == 'tool' -%}## Return of {{ m['tool_call_id'] }}
{{ text(m.get('content')) }}
{%- else -%}{{ text(m.get('content')) }}
{%- endif -%}<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"""

# A segment: (text, is_marker, trained). Markers are special tokens; trained marks assistant output.
Segment = tuple[str, bool, bool]


def _content(content, where: str, images: bool = False) -> list[tuple[str, bool]]:
    """Content as (text, is_marker) pieces; image_url parts (where allowed) become the media markers."""
    if content is None or isinstance(content, str):
        return [(content or "", False)]
    kinds = ("text", "image_url") if images else ("text",)
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in kinds for p in content):
        return [piece for p in content for piece in (MEDIA if p["type"] == "image_url" else [(p["text"], False)])]
    allowed = "text or image_url parts" if images else "text parts"
    raise ValueError(f"{where}: content must be a string, null, or a list of {allowed}, got {content!r:.80}")


def _text(content, where: str) -> str:
    return "".join(text for text, _ in _content(content, where))


def _check_free_of(text: str, markers: tuple[str, ...], where: str) -> None:
    for mk in markers:
        if mk in text:
            raise ValueError(f"{where} contains the marker {mk}, which would be read back as format")


def tool_call_id(call: dict, index: int) -> str:
    return call.get("id") or f"functions.{call['function']['name']}:{index}"


def arguments_text(arguments) -> str:
    """The arguments as written between the argument marker and <|tool_call_end|>."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return text.replace("<|", "\\u003c|")


def assistant_segments(message: dict, where: str = "assistant message") -> Iterator[Segment]:
    """The body the model produces for an assistant message, without the closing <|im_end|>."""
    reasoning = message.get("reasoning_content")
    if reasoning is not None:
        _check_free_of(reasoning, ("</think>",) + TOOL_MARKERS, f"{where} reasoning_content")
        yield from (("<think>", True, True), (reasoning, False, True), ("</think>", True, True))
    content = _text(message.get("content"), where)
    _check_free_of(content, TOOL_MARKERS, f"{where} content")
    if reasoning is None and content.startswith("<think>"):
        raise ValueError(f"{where} content starts with <think>, which would be read back as reasoning")
    yield content, False, True
    calls = message.get("tool_calls") or []
    if calls:
        yield "<|tool_calls_section_begin|>", True, True
        for i, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or "name" not in fn or "arguments" not in fn:
                raise ValueError(f"{where} tool_calls[{i}] needs function.name and function.arguments")
            cid = tool_call_id(call, i)
            _check_free_of(cid, ("<|",), f"{where} tool_calls[{i}].id")
            yield from (("<|tool_call_begin|>", True, True), (cid, False, True),
                        ("<|tool_call_argument_begin|>", True, True), (arguments_text(fn["arguments"]), False, True),
                        ("<|tool_call_end|>", True, True))
        yield "<|tool_calls_section_end|>", True, True


def segments(messages: list[dict], tools: list[dict] | None = None,
             add_generation_prompt: bool = False) -> Iterator[Segment]:
    def turn(marker: str, name: str, body: str) -> Iterator[Segment]:
        yield from ((marker, True, False), (name, False, False), ("<|im_middle|>", True, False),
                    (body, False, False), ("<|im_end|>", True, False))

    if tools:
        yield from turn("<|im_system|>", "tool_declare", json.dumps(tools, ensure_ascii=False, separators=(",", ":")))
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLE_MARKER:
            raise ValueError(f"{where}: role must be one of {sorted(ROLE_MARKER)}, got {role!r}")
        if i == 0 and role != "system":
            yield from turn("<|im_system|>", "system", DEFAULT_SYSTEM_PROMPT)
        name = m.get("name") or role
        if role == "assistant":
            yield from ((ROLE_MARKER[role], True, False), (name, False, False), ("<|im_middle|>", True, False))
            yield from assistant_segments(m, where)
            yield "<|im_end|>", True, True
        elif role == "tool":
            if "tool_call_id" not in m:
                raise ValueError(f"{where}: a tool message needs tool_call_id")
            body = f"## Return of {m['tool_call_id']}\n" + _text(m.get("content"), where)
            yield from turn(ROLE_MARKER[role], name, body)
        else:  # user and system turns may carry images
            yield from ((ROLE_MARKER[role], True, False), (name, False, False), ("<|im_middle|>", True, False))
            yield from ((text, marker, False) for text, marker in _content(m.get("content"), where, images=True))
            yield "<|im_end|>", True, False
    if add_generation_prompt:
        yield from (("<|im_assistant|>", True, False), ("assistant", False, False), ("<|im_middle|>", True, False))


def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
    """The conversation as K2 chat text (what `CHAT_TEMPLATE` renders)."""
    return "".join(text for text, _, _ in segments(messages, tools, add_generation_prompt))


def render_assistant(message: dict) -> str:
    """The text a model generates for `message` after the generation prompt (without <|im_end|>)."""
    return "".join(text for text, _, _ in assistant_segments(message))


def render_sft(tokenizer: Tokenizer, messages: list[dict],
               tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a loss mask: 1 on what the assistant produces (reasoning, content,
    tool-call section, the closing <|im_end|>), 0 elsewhere. Text is encoded with special tokens
    disallowed, so content that spells a marker stays ordinary text."""
    ids: list[int] = []
    mask: list[int] = []
    pending, pending_trained = "", False

    def flush() -> None:
        nonlocal pending
        if pending:
            new = tokenizer.encode(pending)
            ids.extend(new)
            mask.extend([int(pending_trained)] * len(new))
            pending = ""

    for text, is_marker, trained in segments(messages, tools):
        if is_marker:
            flush()
            ids.append(tokenizer.special_tokens[text])
            mask.append(int(trained))
        elif text:
            if pending and trained != pending_trained:
                flush()
            pending, pending_trained = pending + text, trained
    flush()
    return ids, mask


def _json_arg(value: str, what: str):
    """Inline JSON (starts with [ or {), else the path of a JSON file; DatasetError naming the value otherwise."""
    text, where = value, f"{what} (inline JSON)"
    if not value.lstrip().startswith(("[", "{")):
        path, where = Path(value), f"{what} file {value}"
        if not path.is_file():
            raise DatasetError(f"{what} {value!r} is neither inline JSON nor an existing file")
        text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def load_conversation(messages: str, tools: str | None = None) -> tuple[list[dict], list[dict] | None]:
    """A conversation given inline or as a file: a JSON list of messages, or an object with `messages` (and
    `tools`); `tools`, inline or a file, is a JSON list of tool declarations."""
    data = _json_arg(messages, "--messages")
    msgs, tls = (data, None) if isinstance(data, list) else (data.get("messages"), data.get("tools"))
    if not isinstance(msgs, list):
        raise DatasetError(f"--messages {messages[:80]!r}: expected a list of messages or an object with a "
                           "'messages' list")
    if tools is not None:
        tls = _json_arg(tools, "--tools")
        if not isinstance(tls, list):
            raise DatasetError(f"--tools {tools[:80]!r}: expected a JSON list of tool declarations")
    return msgs, tls
