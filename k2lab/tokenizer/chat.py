"""The Kimi chat formats: OpenAI-style messages -> text, and -> token ids with an SFT loss mask.

Two named formats (`templates.CHAT_FORMATS`); "k2.6" (K2.5/K2.6 checkpoints, the default) renders exactly what
Moonshot's `chat_template.jinja` + `tokenization_kimi.py` render:

    [<|im_system|>tool_declare<|im_middle|>{tools_ts_str, or the sorted tools as compact JSON}<|im_end|>]
    <|im_{user|assistant|system}|>{name or role}<|im_middle|>{body}<|im_end|>   per message (tool -> im_system)
    [<|im_assistant|>assistant<|im_middle|><think>]       generation prompt; `<think></think>` with thinking=False

Assistant body: `<think>{reasoning_content}</think>`, the content, then `<|tool_calls_section_begin|>` + per call
`<|tool_call_begin|>{id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>` + `<|tool_calls_section_end|>`.
Assistant turns up to and including the last one without tool calls drop their reasoning (`<think></think>`),
and so do all of them with thinking=False; `preserve_thinking=True` keeps every turn's reasoning. Tool body:
`## Return of {tool_call_id}\\n{content}`. No system turn is added.

"k2-instruct" (K2-Instruct 0711/0905): tools as compact JSON, a default system turn when messages[0] is not
system, reasoning (when given) kept in every turn, generation prompt `<|im_assistant|>assistant<|im_middle|>`.

Choices k2lab makes where the formats are silent: a call without an id gets `functions.{name}:{n}`, n counting
the calls of the whole conversation (`next_tool_call_index`); in tool-call arguments `<|` is written `\\u003c|`
(the same JSON value) so an argument cannot spell a marker; a null reasoning_content renders as empty.
`render` (Python) and the template of `templates.py` produce identical strings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from k2lab.data import DatasetError
from k2lab.tokenizer.templates import K2_6, K2_6_TEMPLATE, K2_INSTRUCT, check_format
from k2lab.tokenizer.tokenizer import Tokenizer
from k2lab.tokenizer.tools_ts import deep_sort, tools_ts_str

CHAT_TEMPLATE = K2_6_TEMPLATE  # the template of the default format
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
ROLE_MARKER = {"user": "<|im_user|>", "assistant": "<|im_assistant|>", "system": "<|im_system|>",
               "tool": "<|im_system|>"}
TOOL_MARKERS = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|im_end|>")

# An image part: one <|media_pad|> that the vision stage expands to the image's merged patch count; K2.6 writes
# a newline after it.
MEDIA = (("<|media_begin|>", True), ("image", False), ("<|media_content|>", True), ("<|media_pad|>", True),
         ("<|media_end|>", True))
MEDIA_K26 = MEDIA + (("\n", False),)

# A segment: (text, is_marker, trained). Markers are special tokens; trained marks what the model generates.
Segment = tuple[str, bool, bool]


def template_kwargs(tools: list[dict] | None, chat_format: str = K2_6) -> dict:
    """What Moonshot's tokenizer hands its template besides the messages: for "k2.6" the tools sorted and
    `tools_ts_str`. Pass these to transformers' apply_chat_template to render what `render` renders."""
    if check_format(chat_format) != K2_6 or not tools:
        return {"tools": tools}
    ts = tools_ts_str(tools)
    return {"tools": deep_sort(tools), **({"tools_ts_str": ts} if ts else {})}


def _content(content, where: str, images: bool = False, media=MEDIA) -> list[tuple[str, bool]]:
    """Content as (text, is_marker) pieces; image_url parts (where allowed) become `media`."""
    if content is None or isinstance(content, str):
        return [(content or "", False)]
    kinds = ("text", "image_url") if images else ("text",)
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in kinds for p in content):
        return [piece for p in content for piece in (media if p["type"] == "image_url" else [(p["text"], False)])]
    allowed = "text or image_url parts" if images else "text parts"
    raise ValueError(f"{where}: content must be a string, null, or a list of {allowed}, got {content!r:.80}")


def _text(content, where: str) -> str:
    return "".join(text for text, _ in _content(content, where))


def _check_free_of(text: str, markers: tuple[str, ...], where: str) -> None:
    for mk in markers:
        if mk in text:
            raise ValueError(f"{where} contains the marker {mk}, which would be read back as format")


def arguments_text(arguments) -> str:
    """The arguments as written between the argument marker and <|tool_call_end|>."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return text.replace("<|", "\\u003c|")


def next_tool_call_index(messages: list[dict]) -> int:
    """The number of tool calls made so far in the conversation: the index a new call's id
    (`functions.{name}:{index}`) should carry so that ids stay unique across turns."""
    return sum(len(m.get("tool_calls") or []) for m in messages if isinstance(m, dict) and m.get("role") == "assistant")


def assistant_segments(message: dict, where: str = "assistant message", *, think: str = "keep",
                       first_call: int = 0) -> Iterator[Segment]:
    """The body of an assistant message, without the closing <|im_end|>. think: "keep" writes
    `<think>{reasoning}</think>` (K2.6: `<think>` is prompt-side, the model generates from the reasoning on),
    "drop" writes an empty `<think></think>` (all prompt-side), "instruct" the K2-Instruct way (a think block,
    all generated, only when reasoning_content is not None)."""
    reasoning = message.get("reasoning_content")
    if reasoning is not None:
        _check_free_of(reasoning, ("</think>",) + TOOL_MARKERS, f"{where} reasoning_content")
    if think == "keep":
        yield from (("<think>", True, False), (reasoning or "", False, True), ("</think>", True, True))
    elif think == "drop":
        yield from (("<think>", True, False), ("</think>", True, False))
    elif reasoning is not None:
        yield from (("<think>", True, True), (reasoning, False, True), ("</think>", True, True))
    content = _text(message.get("content"), where)
    _check_free_of(content, TOOL_MARKERS, f"{where} content")
    if think == "instruct" and reasoning is None and content.lstrip(" \t\r\n").startswith("<think>"):
        raise ValueError(f"{where} content starts with <think>, which would be read back as reasoning")
    yield content, False, True
    calls = message.get("tool_calls") or []
    if calls:
        yield "<|tool_calls_section_begin|>", True, True
        for i, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or "name" not in fn or "arguments" not in fn:
                raise ValueError(f"{where} tool_calls[{i}] needs function.name and function.arguments")
            cid = call.get("id") or f"functions.{fn['name']}:{first_call + i}"
            _check_free_of(cid, ("<|",), f"{where} tool_calls[{i}].id")
            yield from (("<|tool_call_begin|>", True, True), (cid, False, True),
                        ("<|tool_call_argument_begin|>", True, True), (arguments_text(fn["arguments"]), False, True),
                        ("<|tool_call_end|>", True, True))
        yield "<|tool_calls_section_end|>", True, True


def _last_plain_assistant(messages: list[dict], before: int) -> int:
    """Index of the last assistant message without tool calls among messages[:before] (-1 if none)."""
    return max((i for i, m in enumerate(messages[:before])
                if isinstance(m, dict) and m.get("role") == "assistant" and not m.get("tool_calls")), default=-1)


def _segments(messages: list[dict], tools, add_generation_prompt: bool, chat_format: str, thinking: bool,
              preserve_thinking: bool, drop_until: int, train_from: int) -> Iterator[Segment]:
    """Segments with reasoning dropped (K2.6) for assistant turns at index <= drop_until (all of them when not
    thinking, unless preserve_thinking) and the trained flag kept only for assistant turns at index >= train_from."""
    def turn(marker: str, name: str, body: str) -> Iterator[Segment]:
        yield from ((marker, True, False), (name, False, False), ("<|im_middle|>", True, False),
                    (body, False, False), ("<|im_end|>", True, False))

    k26 = check_format(chat_format) == K2_6
    if tools:
        declared = (tools_ts_str(tools) or json.dumps(deep_sort(tools), ensure_ascii=False, separators=(",", ":"))
                    if k26 else json.dumps(tools, ensure_ascii=False, separators=(",", ":")))
        yield from turn("<|im_system|>", "tool_declare", declared)
    calls = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLE_MARKER:
            raise ValueError(f"{where}: role must be one of {sorted(ROLE_MARKER)}, got {role!r}")
        if i == 0 and role != "system" and not k26:
            yield from turn("<|im_system|>", "system", DEFAULT_SYSTEM_PROMPT)
        name = m.get("name") or role
        if role == "assistant":
            dropped = i <= drop_until or not (thinking or preserve_thinking)
            think = "instruct" if not k26 else "drop" if dropped else "keep"
            yield from ((ROLE_MARKER[role], True, False), (name, False, False), ("<|im_middle|>", True, False))
            for text, is_marker, trained in assistant_segments(m, where, think=think, first_call=calls):
                yield text, is_marker, trained and i >= train_from
            yield "<|im_end|>", True, i >= train_from
            calls += len(m.get("tool_calls") or [])
        elif role == "tool":
            if "tool_call_id" not in m:
                raise ValueError(f"{where}: a tool message needs tool_call_id")
            body = f"## Return of {m['tool_call_id']}\n" + _text(m.get("content"), where)
            yield from turn(ROLE_MARKER[role], name, body)
        else:  # user and system turns may carry images
            yield from ((ROLE_MARKER[role], True, False), (name, False, False), ("<|im_middle|>", True, False))
            pieces = _content(m.get("content"), where, images=True, media=MEDIA_K26 if k26 else MEDIA)
            yield from ((text, marker, False) for text, marker in pieces)
            yield "<|im_end|>", True, False
    if add_generation_prompt:
        yield from (("<|im_assistant|>", True, False), ("assistant", False, False), ("<|im_middle|>", True, False))
        if k26:
            yield from (("<think>", True, False),) + ((("</think>", True, False),) if not thinking else ())


def segments(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False, *,
             chat_format: str = K2_6, thinking: bool = True, preserve_thinking: bool = False) -> Iterator[Segment]:
    """The conversation as (text, is_marker, trained) pieces; `render` joins the texts."""
    drop = -1 if preserve_thinking else _last_plain_assistant(messages, len(messages))
    return _segments(messages, tools, add_generation_prompt, chat_format, thinking, preserve_thinking, drop, 0)


def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False, *,
           chat_format: str = K2_6, thinking: bool = True, preserve_thinking: bool = False) -> str:
    """The conversation as chat text (what the format's Jinja template renders)."""
    return "".join(text for text, _, _ in segments(messages, tools, add_generation_prompt, chat_format=chat_format,
                                                    thinking=thinking, preserve_thinking=preserve_thinking))


def render_assistant(message: dict, *, chat_format: str = K2_6, thinking: bool = True, first_call: int = 0) -> str:
    """The text a model generates for `message` after the generation prompt (without <|im_end|>): for K2.6
    that starts inside the think block the prompt opened (reasoning, `</think>`, content, calls). Calls without
    an id are numbered from `first_call` (`next_tool_call_index` of the messages before it)."""
    if check_format(chat_format) == K2_INSTRUCT:
        return "".join(text for text, _, _ in assistant_segments(message, think="instruct", first_call=first_call))
    think = "keep" if thinking else "drop"
    return "".join(text for text, _, _ in assistant_segments(message, think=think, first_call=first_call))[
        len("<think>") if thinking else len("<think></think>"):]


def render_sft(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None, *,
               chat_format: str = K2_6, thinking: bool = True,
               preserve_thinking: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a loss mask: 1 exactly on what the assistant generates (reasoning and
    `</think>`, content, tool-call section, the closing <|im_end|>), 0 elsewhere. Text is encoded with special
    tokens disallowed, so content that spells a marker stays ordinary text.

    K2.6 drops the reasoning of assistant turns up to the last one without tool calls, so one rendering of a
    multi-turn conversation cannot show every turn in the context it was generated in, and training on turns
    rendered as `<think></think>` would teach the model to stop thinking. So, unless preserve_thinking:
    the sequence is the context of the trailing assistant/tool turns (those after the last user or system
    message), that is `render(messages[:t], add_generation_prompt=True)` followed by those turns with their
    reasoning, and only the trailing assistant turns are trained; earlier turns are context (mask 0). To
    train every turn, call this once per prefix that ends before a user message. With preserve_thinking
    every assistant turn keeps its reasoning and all are trained. With thinking=False every turn renders as
    `<think></think>` (prompt-side, as the thinking-off generation prompt ends), exactly as it was generated, so
    all are trained. K2-Instruct trains every assistant turn."""
    if check_format(chat_format) == K2_INSTRUCT or preserve_thinking or not thinking:
        drop, train_from = -1, 0
    else:
        train_from = len(messages)
        while train_from and isinstance(messages[train_from - 1], dict) and \
                messages[train_from - 1].get("role") in ("assistant", "tool"):
            train_from -= 1
        drop = _last_plain_assistant(messages, train_from)
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

    for text, is_marker, trained in _segments(messages, tools, False, chat_format, thinking, preserve_thinking, drop,
                                                train_from):
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
