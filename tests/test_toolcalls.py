"""Tool-call parsing: render -> parse round trips, streaming == one-shot for every split (characters and
real tokens), and malformed output that never crashes the parser."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2lab.tokenizer.chat import K2_6, K2_INSTRUCT, render_assistant
from k2lab.tokenizer.toolcalls import StreamingParser, collect, parse

MARKERS = ["<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
           "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|im_end|>", "<think>", "</think>"]
CHARS = st.characters(codec="utf-8")
# Strings that look like format: markers, their prefixes, quotes, newlines, escapes.
TRICKY = st.sampled_from(MARKERS + [m[:k] for m in MARKERS for k in (1, 2, 5)] +
                         ['"', '\\"', "\n", "\\n", "\\u003c|", "functions.x:0", "{", "}", "## Return of"])
STRING = st.lists(st.text(CHARS, max_size=8) | TRICKY, max_size=5).map("".join)
SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
JSON = st.recursive(SCALAR | STRING,
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(STRING, c, max_size=3), max_leaves=12)
ARGS = st.dictionaries(STRING, JSON, max_size=4)
NAME = st.from_regex(r"[A-Za-z0-9_\-]{1,64}", fullmatch=True)
PLAIN = st.text(CHARS, max_size=40).filter(lambda s: not any(m in s for m in MARKERS))


@st.composite
def assistant(draw):
    m = {"role": "assistant", "content": draw(PLAIN)}
    if draw(st.booleans()):
        m["reasoning_content"] = draw(PLAIN)
    calls = []
    for i in range(draw(st.integers(0, 4))):
        name, args = draw(NAME), draw(ARGS)
        as_text = draw(st.sampled_from([None, 0, 2]))  # dict, or a JSON string with some indentation
        calls.append({"type": "function", "function": {
            "name": name, "arguments": args if as_text is None else json.dumps(args, indent=as_text or None)}})
    if calls:
        m["tool_calls"] = calls
    return m


# How each format's generation reads back: K2.6's thinking prompt ends with <think>, so its output starts inside
# the reasoning; K2-Instruct output opens its own <think> block, if any.
FORMATS = st.sampled_from([K2_6, K2_INSTRUCT])


def generated(m, fmt):
    return render_assistant(m, chat_format=fmt) + "<|im_end|>"


def parse_as(text, fmt):
    return parse(text, in_reasoning=fmt == K2_6)


def expected_reasoning(m, fmt):
    return (m.get("reasoning_content") or "") if fmt == K2_6 else m.get("reasoning_content")


def expected_calls(m):
    return [(f"functions.{c['function']['name']}:{i}", c["function"]["name"],
             c["function"]["arguments"] if isinstance(c["function"]["arguments"], dict)
             else json.loads(c["function"]["arguments"])) for i, c in enumerate(m.get("tool_calls", []))]


def got_calls(parsed):
    return [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]


def stream(pieces, **kw):
    p = StreamingParser(**kw)
    events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
    return collect(events), events


@settings(max_examples=300, deadline=None)
@given(assistant(), FORMATS)
def test_render_then_parse_returns_the_same_message(m, fmt):
    parsed = parse_as(generated(m, fmt), fmt)
    assert parsed.errors == []
    assert parsed.content == m["content"]
    assert parsed.reasoning_content == expected_reasoning(m, fmt)
    assert got_calls(parsed) == expected_calls(m)
    assert all(c["type"] == "function" for c in parsed.tool_calls)


@settings(max_examples=200, deadline=None)
@given(assistant(), FORMATS, st.data())
def test_streaming_equals_one_shot_for_any_split(m, fmt, data):
    text = generated(m, fmt)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert stream(pieces, in_reasoning=fmt == K2_6)[0] == parse_as(text, fmt)


@settings(max_examples=100, deadline=None)
@given(assistant(), FORMATS)
def test_streaming_token_by_token(tok, m, fmt):
    """Feed what a server decodes token by token from the real token stream."""
    text = generated(m, fmt)
    dec = tok.decoder()
    pieces = [dec.add(i) for i in tok.encode(text, allow_special=True)] + [dec.flush()]
    assert stream(pieces, in_reasoning=fmt == K2_6)[0] == parse_as(text, fmt)


def test_every_two_way_split_and_char_by_char():
    m = {"role": "assistant", "content": "Sure: ", "reasoning_content": "plan", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "北京 \"<|tool_call_end|>\"\n"}}},
        {"function": {"name": "noop", "arguments": "{}"}}]}
    text = generated(m, K2_INSTRUCT)
    whole = parse(text)
    assert len(whole.tool_calls) == 2 and not whole.errors
    for k in range(len(text) + 1):
        assert stream([text[:k], text[k:]])[0] == whole
    assert stream(list(text))[0] == whole


def test_stream_emits_header_once_then_argument_deltas_early():
    text = ('Hi <|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>'
            '{"a": "long value"}<|tool_call_end|><|tool_calls_section_end|>')
    p = StreamingParser()
    head = text.index('{"a"')
    events = [e for ch in text[:head] for e in p.feed(ch)]
    headers = [e for e in events if e["type"] == "tool_call"]
    assert headers == [{"type": "tool_call", "index": 0, "id": "functions.f:0", "name": "f"}]
    assert "".join(e["text"] for e in events if e["type"] == "content") == "Hi "
    later = [e for ch in text[head:] for e in p.feed(ch)] + p.finish()
    args = [e for e in later if e["type"] == "arguments"]
    assert len(args) > 5 and "".join(e["text"] for e in args) == '{"a": "long value"}'
    assert not any(e["type"] == "tool_call" for e in later)


GOOD = '<|tool_call_begin|>functions.ok:1<|tool_call_argument_begin|>{"x": 1}<|tool_call_end|>'


@pytest.mark.parametrize("text, content, n_calls, error", [
    ("<think>never closed", "", 0, "unclosed <think>"),
    ("Hi<|tool_calls_section_begin|>" + GOOD, "Hi", 1, "unclosed tool-calls section"),
    ("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0{}<|tool_call_end|>" + GOOD
     + "<|tool_calls_section_end|>", "", 1, "has no <|tool_call_argument_begin|>"),
    ("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"a\": }"
     "<|tool_call_end|>" + GOOD + "<|tool_calls_section_end|>", "", 1, "not valid JSON"),
    ("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>[1]"
     "<|tool_call_end|><|tool_calls_section_end|>", "", 0, "not a JSON object"),
    ("<|tool_calls_section_begin|><|tool_call_begin|>functions.f<|tool_call_argument_begin|>{}<|tool_call_end|>"
     + GOOD + "<|tool_calls_section_end|>", "", 1, "malformed tool call id 'functions.f'"),
    ("<|tool_calls_section_begin|><|tool_call_begin|>get.weather.0<|tool_call_argument_begin|>{}<|tool_call_end|>"
     "<|tool_calls_section_end|>", "", 0, "malformed tool call id"),
    ("<|tool_calls_section_begin|><|tool_call_begin|>0<|tool_call_argument_begin|>{}<|tool_call_end|>"
     "<|tool_calls_section_end|>", "", 0, "no tools were offered"),
    ("<|tool_calls_section_begin|><|tool_calls_section_begin|>" + GOOD + "<|tool_calls_section_end|>", "", 1, "nested"),
    ("<|tool_calls_section_begin|><|tool_call_begin|><|tool_call_end|>" + GOOD + "<|tool_calls_section_end|>", "", 1,
     "tool call '' has no"),
    ("<|tool_calls_section_begin|><|tool_calls_section_end|>after", "after", 0, None),
    ("x" + GOOD, "x", 1, "outside a tool-calls section"),
    ("<|tool_calls_section_begin|>junk" + GOOD + "<|tool_calls_section_end|>", "", 1, "text outside any call"),
    ("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{\"a\":"
     + GOOD + "<|tool_calls_section_end|>", "", 1, "unclosed: the next <|tool_call_begin|>"),
    ("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|im_end|>tail",
     "", 0, "<|im_end|> came"),
    ("<|tool_call_end|><|tool_calls_section_end|>plain", "<|tool_call_end|><|tool_calls_section_end|>plain", 0, None),
])
def test_malformed_output_is_recovered_and_reported(text, content, n_calls, error):
    parsed = parse(text)
    assert parsed.content == content
    assert len(parsed.tool_calls) == n_calls
    assert all(c["id"] == "functions.ok:1" for c in parsed.tool_calls)
    if error is None:
        assert parsed.errors == []
    else:
        assert any(error in e for e in parsed.errors), parsed.errors
    assert stream(list(text))[0] == parsed


FRAGMENTS = st.sampled_from(MARKERS + ["functions.f:0", "functions.g", ":1", "0", "g:2", '{"a": 1}', '{"x": 1}', "{",
                             "}", "[1]", " ", "\n"])
TOOL_SETS = st.sampled_from([None, [{"type": "function", "function": {"name": "f"}}],
                             [{"type": "function", "function": {"name": n, "parameters": {
                                 "type": "object", "properties": {k: {}}}}} for n, k in (("f", "a"), ("g", "x"))]])


@settings(max_examples=400, deadline=None)
@given(st.lists(FRAGMENTS | st.text(CHARS, max_size=6), max_size=25).map("".join), TOOL_SETS, st.booleans(),
       st.data())
def test_no_input_crashes_and_streaming_agrees(text, tools, in_reasoning, data):
    parsed = parse(text, tools, in_reasoning)
    for c in parsed.tool_calls:
        assert isinstance(json.loads(c["function"]["arguments"]), dict) and c["id"] == c["id"].strip()
        assert c["function"]["arguments"] == c["function"]["arguments"].strip()
    # a marker that opens calls never stays in the reasoning: it ends the reasoning and opens the section
    opening = ("<|tool_calls_section_begin|>", "<|tool_call_begin|>")
    assert not any(m in (parsed.reasoning_content or "") for m in opening)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert stream(pieces, tools=tools, in_reasoning=in_reasoning)[0] == parsed


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(raw):
    text = raw.decode("utf-8", errors="replace")
    assert stream(list(text))[0] == parse(text)


def test_to_message():
    parsed = parse("<|tool_calls_section_begin|>" + GOOD + "<|tool_calls_section_end|><|im_end|>")
    msg = parsed.to_message()
    assert msg["content"] is None and msg["tool_calls"][0]["function"] == {"name": "ok", "arguments": '{"x": 1}'}
    assert "reasoning_content" not in msg


def test_second_argument_marker_drops_the_call_once():
    text = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"
            "<|tool_call_argument_begin|>}<|tool_call_end|>" + GOOD + "<|tool_calls_section_end|>")
    parsed, events = stream(list(text))
    assert [c["id"] for c in parsed.tool_calls] == ["functions.ok:1"] and len(parsed.errors) == 1
    assert "".join(e["text"] for e in events if e["type"] == "arguments" and e["index"] == 0) == "{"
    assert parse(text) == parsed
