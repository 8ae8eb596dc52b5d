"""vLLM's published test cases for its `kimi_k2` tool-call parser (tests/tool_parsers/test_kimi_k2_tool_parser.py)
and reasoning parser (tests/reasoning/test_kimi_k2_reasoning_parser.py), inputs and expected outputs written as
k2lab tests, whole and streaming. k2lab parses reasoning and tool calls in one pass (`parse` / `StreamingParser`);
the reasoning cases use `in_reasoning=True`, as the K2.5/K2.6 thinking prompt ends with `<think>`.

Deliberate differences (README, "Deliberate differences from vLLM"), each asserted below as k2lab's behavior:
a call whose arguments are not a JSON object, or that the output left unclosed, is dropped and reported in
`errors` (vLLM passes it on); text after the tool-calls section stays content (vLLM drops it); content is ""
rather than None when the output is all reasoning."""

import json

import pytest

from k2lab.tokenizer.toolcalls import StreamingParser, collect, parse

SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
TOOL_BEGIN, TOOL_END, ARG_BEGIN = "<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>"
MARKERS = [SECTION_BEGIN, SECTION_END, TOOL_BEGIN, TOOL_END, ARG_BEGIN]


def _tool(tool_id, args):
    return f"{TOOL_BEGIN}{tool_id} {ARG_BEGIN}{args}{TOOL_END}"


def _wrap(*tools):
    return SECTION_BEGIN + "".join(tools) + SECTION_END


def _fn(name, *props):
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {p: {"type": "string"} for p in props}}}}


WEATHER, READ_FILE = _fn("get_weather", "city", "unit"), _fn("read_file", "path")
BOOK_FLIGHT = _fn("book_flight", "city")


def _stream(deltas, **kw):
    p = StreamingParser(**kw)
    events = [e for d in deltas for e in p.feed(d)] + p.finish()
    return collect(events), events


def _split(content, calls):
    """vLLM's _split_tool_output_to_deltas: each marker its own delta, a space after ids and arguments."""
    deltas = [content, SECTION_BEGIN]
    for tool_id, args in calls:
        deltas += [TOOL_BEGIN, f"{tool_id} ", ARG_BEGIN, f"{args} ", TOOL_END]
    return deltas + [SECTION_END]


def _args(parsed):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]


# ---- tool parser, whole output (TestExtractToolCalls) ----
def test_no_tools():
    parsed = parse("This is a test")
    assert parsed.content == "This is a test" and parsed.tool_calls == [] and parsed.errors == []


@pytest.mark.parametrize("output, expected, content", [
    ("I'll check. " + _wrap(_tool("functions.get_weather:0", '{"city": "Beijing"}')),
     [("get_weather", {"city": "Beijing"})], "I'll check. "),
    ("Compare weather. " + _wrap(_tool("functions.get_weather:0", '{"city": "Beijing"}'),
                                 _tool("functions.get_weather:1", '{"city": "Shanghai"}')),
     [("get_weather", {"city": "Beijing"}), ("get_weather", {"city": "Shanghai"})], "Compare weather. "),
    ("Multiple tasks. " + _wrap(_tool("functions.get_weather:0", '{"city": "New York"}'),
                                _tool("functions.get_news:1", '{"topic": "technology"}'),
                                _tool("functions.send_email:2",
                                      '{"to": "user@example.com", "subject": "Daily Update"}')),
     [("get_weather", {"city": "New York"}), ("get_news", {"topic": "technology"}),
      ("send_email", {"to": "user@example.com", "subject": "Daily Update"})], "Multiple tasks. "),
    ("Process HTML. " + _wrap(_tool("functions.process_html:0", '{"html": "<div>content</div>"}')),
     [("process_html", {"html": "<div>content</div>"})], "Process HTML. "),
    ("Formatted. " + _wrap(_tool("functions.process_data:0", '{\n  "name": "test",\n  "value": 123\n}')),
     [("process_data", {"name": "test", "value": 123})], "Formatted. "),
    ("No prefix. " + _wrap(_tool("get_weather:0", '{"city": "Tokyo"}')), [("get_weather", {"city": "Tokyo"})],
     "No prefix. "),
    ("Empty args. " + _wrap(_tool("functions.test:0", "{}")), [("test", {})], "Empty args. "),
], ids=["single", "parallel", "three", "angle_brackets_in_json", "multiline_json", "no_functions_prefix",
        "empty_arguments"])
def test_extract_tool_calls(output, expected, content):
    parsed = parse(output)
    assert parsed.content == content and parsed.errors == []
    assert _args(parsed) == expected
    assert all(c["type"] == "function" and c["id"].split(":")[-1].isdigit() for c in parsed.tool_calls)
    assert _stream(list(output))[0] == parsed


def test_invalid_json_is_reported_not_passed_on():
    """vLLM returns both calls, the bad one with its arguments as-is; k2lab drops it and says why."""
    output = "Help. " + SECTION_BEGIN + _tool("functions.bad:0", '{"city": "Beijing"') + \
        _tool("functions.good:1", '{"city": "Shanghai"}') + SECTION_END
    parsed = parse(output)
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["good"]
    assert len(parsed.errors) == 1 and "functions.bad:0" in parsed.errors[0] and "not valid JSON" in parsed.errors[0]


def test_invalid_funcall_id_skipped():
    output = "Help. " + SECTION_BEGIN + _tool("functions.invalid.0", '{"city": "Beijing"}') + \
        _tool("functions.valid:1", '{"city": "Shanghai"}') + SECTION_END
    parsed = parse(output)
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["valid"]
    assert any("malformed tool call id 'functions.invalid.0'" in e for e in parsed.errors)


def test_native_id_extracted_and_kept_across_turns():
    turn1 = parse("Let me check. " + _wrap(_tool("functions.get_weather:0", '{"city": "Beijing"}')))
    turn2 = parse("Now let me get news. " + _wrap(_tool("functions.get_news:0", '{"topic": "weather in Beijing"}')))
    assert [c["id"] for c in turn1.tool_calls] == ["functions.get_weather:0"]
    assert [c["id"] for c in turn2.tool_calls] == ["functions.get_news:0"]
    assert _args(turn1) == [("get_weather", {"city": "Beijing"})]


def test_bare_counter():
    arguments = {"city": "Tokyo", "unit": "celsius"}
    parsed = parse("Let me check. " + _wrap(_tool("0", json.dumps(arguments))), tools=[WEATHER])
    assert parsed.content == "Let me check. " and parsed.errors == []
    assert [c["id"] for c in parsed.tool_calls] == ["0"] and _args(parsed) == [("get_weather", arguments)]


def test_bare_counter_single_tool_invalid_json_is_reported():
    """vLLM returns the call with arguments '{"city": "Tokyo"'; k2lab drops it and says why."""
    parsed = parse("Let me check. " + _wrap(_tool("0", '{"city": "Tokyo"')), tools=[WEATHER])
    assert parsed.tool_calls == [] and any("not valid JSON" in e for e in parsed.errors)


def test_bare_counter_multiple_tools_infers_by_args():
    arguments = {"city": "Tokyo", "unit": "celsius"}
    parsed = parse("Let me check. " + _wrap(_tool("0", json.dumps(arguments))), tools=[READ_FILE, WEATHER])
    assert [c["id"] for c in parsed.tool_calls] == ["0"] and _args(parsed) == [("get_weather", arguments)]


@pytest.mark.parametrize("arguments", [json.dumps({"city": "Tokyo"}), '{"city": "Tokyo"'],
                         ids=["ambiguous", "malformed_json"])
def test_bare_counter_multiple_tools_skips_unsafe_inference(arguments):
    parsed = parse("Let me check. " + _wrap(_tool("0", arguments)), tools=[WEATHER, BOOK_FLIGHT])
    assert parsed.tool_calls == [] and any("fit no single offered tool" in e for e in parsed.errors)


# ---- tool parser, streaming (TestStreamingHappyPath, TestStreamingEdgeCases) ----
def test_streaming_single_and_multiple_tool_calls():
    parsed, events = _stream(_split("I'll help. ", [("functions.get_weather:0", '{"city": "Beijing"}')]))
    assert [c["id"] for c in parsed.tool_calls] == ["functions.get_weather:0"]
    assert _args(parsed) == [("get_weather", {"city": "Beijing"})]
    parsed, _ = _stream(_split("Compare weather. ", [("functions.get_weather:0", '{"city": "Tokyo"}'),
                                                     ("functions.get_weather:1", '{"city": "NYC"}')]))
    assert [c["id"] for c in parsed.tool_calls] == ["functions.get_weather:0", "functions.get_weather:1"]
    assert _args(parsed) == [("get_weather", {"city": "Tokyo"}), ("get_weather", {"city": "NYC"})]


def test_streaming_arguments_are_stripped():
    """vLLM's deltas put a space after the arguments; the streamed arguments leave it out."""
    _, events = _stream(_split("x", [("functions.f:0", '{"a": 1}')]))
    assert "".join(e["text"] for e in events if e["type"] == "arguments") == '{"a": 1}'


@pytest.mark.parametrize("tools, arguments", [([WEATHER], {"city": "Beijing"}),
                                              ([READ_FILE, WEATHER], {"city": "Beijing", "unit": "celsius"})])
def test_streaming_bare_counter(tools, arguments):
    parsed, _ = _stream(_split("I'll help. ", [("0", json.dumps(arguments))]), tools=tools)
    assert [c["id"] for c in parsed.tool_calls] == ["0"] and _args(parsed) == [("get_weather", arguments)]


def test_streaming_content_before_tools_and_marker_suppression():
    parsed, _ = _stream(_split("I'll check the weather. ", [("functions.get_weather:0", '{"city": "Tokyo"}')]))
    assert parsed.content == "I'll check the weather. "
    assert not any(m in parsed.content for m in MARKERS + ["get_weather", "Tokyo"])


def test_streaming_plain_text():
    parsed, _ = _stream(["This is just ", "regular text ", "without tools."])
    assert parsed.content == "This is just regular text without tools." and parsed.tool_calls == []


def test_streaming_incremental_arguments():
    deltas = ["Help. ", SECTION_BEGIN, TOOL_BEGIN, "functions.get_weather:0 ", ARG_BEGIN, '{"ci', 'ty": "Be', 'ijing"}',
              " ", TOOL_END, SECTION_END]
    assert _args(_stream(deltas)[0]) == [("get_weather", {"city": "Beijing"})]


@pytest.mark.parametrize("output", [
    "Single. " + _wrap(_tool("functions.get_weather:0", '{"city": "Beijing"}')),
    "Multi. " + _wrap(_tool("functions.get_weather:0", '{"city": "Tokyo"}'), _tool("functions.get_news:1",
                                                                                  '{"topic": "tech"}')),
    "No prefix id. " + _wrap(_tool("get_weather:0", '{"city": "NYC"}')),
])
def test_streaming_matches_nonstreaming(output):
    whole = parse(output)
    for k in range(len(output) + 1):
        assert _stream([output[:k], output[k:]])[0] == whole


def test_noise_between_markers_suppressed():
    deltas = ["Reasoning. ", SECTION_BEGIN, " spurious noise ", TOOL_BEGIN, "functions.test:0 ", ARG_BEGIN,
              '{"k": "v"} ', TOOL_END, SECTION_END]
    parsed, _ = _stream(deltas)
    assert "spurious" not in parsed.content and _args(parsed) == [("test", {"k": "v"})]


def test_empty_tool_section():
    parsed, _ = _stream(["Reasoning. ", SECTION_BEGIN, SECTION_END])
    assert parsed.tool_calls == [] and parsed.errors == []


def test_three_different_tools_unique_ids():
    parsed, _ = _stream(_split("Multiple tasks. ", [("functions.get_weather:0", '{"city": "NYC"}'),
                                                    ("functions.get_news:1", '{"topic": "tech"}'),
                                                    ("functions.send_email:2", '{"to": "a@b.com"}')]))
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "get_news", "send_email"]
    assert len({c["id"] for c in parsed.tool_calls}) == 3


def test_truncated_tool_call_streams_then_is_reported():
    """vLLM keeps the truncated call (name, id, '{"city": "Bei'); k2lab streams the same header and argument
    deltas, then reports the call unclosed and leaves it out of the message."""
    deltas = ["I'll check. ", SECTION_BEGIN, TOOL_BEGIN, "functions.get_weather:0 ", ARG_BEGIN, '{"city": "Bei']
    parsed, events = _stream(deltas)
    assert [(e["id"], e["name"]) for e in events if e["type"] == "tool_call"] == [
        ("functions.get_weather:0", "get_weather")]
    assert "".join(e["text"] for e in events if e["type"] == "arguments") == '{"city": "Bei'
    assert parsed.tool_calls == [] and any("unclosed" in e for e in parsed.errors)
    assert not any(m in parsed.content for m in MARKERS)


def test_content_after_tool_section_is_kept():
    """vLLM drops text after <|tool_calls_section_end|>; k2lab keeps it as content."""
    deltas = ["Before. ", SECTION_BEGIN, TOOL_BEGIN, "functions.get_weather:0 ", ARG_BEGIN, '{"city": "Tokyo"} ',
              TOOL_END, SECTION_END, " After tools."]
    parsed, _ = _stream(deltas)
    assert _args(parsed) == [("get_weather", {"city": "Tokyo"})]
    assert parsed.content == "Before.  After tools." and not any(m in parsed.content for m in MARKERS)


# ---- streaming at token-chunk intervals (TestStreamingIntervals), with k2lab's tokenizer ----
def _chunks(tok, text, interval):
    ids = tok.encode(text, allow_special=True)
    deltas, prev = [], ""
    for i in range(0, len(ids), interval):
        now = tok.decode(ids[:i + interval])
        deltas.append(now[len(prev):])
        prev = now
    return deltas


@pytest.mark.parametrize("interval", [1, 2, 3, 5, 8, 9999])
def test_streaming_at_token_intervals(tok, interval):
    cases = [
        ("Help. " + _wrap(_tool("functions.get_weather:0", '{"city": "Beijing"}')), "Help. ",
         [("get_weather", {"city": "Beijing"})]),
        ("Sure, let me check. " + _wrap(_tool("functions.get_weather:0", '{"city": "Tokyo"}')),
         "Sure, let me check. ", [("get_weather", {"city": "Tokyo"})]),
        ("Compare. " + _wrap(_tool("functions.search:0", '{"q": "cats"}'),
                             _tool("functions.search:1", '{"q": "dogs"}')),
         "Compare. ", [("search", {"q": "cats"}), ("search", {"q": "dogs"})]),
        ("This is plain text with no tool calling involved.", "This is plain text with no tool calling involved.", []),
    ]
    for text, content, calls in cases:
        parsed, _ = _stream(_chunks(tok, text, interval))
        assert parsed.content == content and _args(parsed) == calls


# ---- reasoning parser (K2.5 model, thinking on) ----
@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>step by step reasoning</think>final answer", "step by step reasoning", "final answer"),
    ("<think></think>final answer", "", "final answer"),
    ("step by step reasoning</think>final answer", "step by step reasoning", "final answer"),
])
def test_extract_reasoning(text, reasoning, content):
    parsed = parse(text, in_reasoning=True)
    assert (parsed.reasoning_content, parsed.content, parsed.errors) == (reasoning, content, [])
    assert _stream(list(text), in_reasoning=True)[0] == parsed


def test_implicit_start_everything_is_reasoning():
    parsed = parse("implicit reasoning with no tags", in_reasoning=True)
    assert parsed.reasoning_content == "implicit reasoning with no tags"
    assert parsed.content == "" and parsed.tool_calls == []  # vLLM: content None


def test_tool_section_ends_reasoning():
    """vLLM hands '<|tool_calls_section_begin|>tool call data' on to the tool parser as content; k2lab parses it
    in the same pass: no valid call in it, and none of it in the reasoning."""
    parsed = parse("some reasoning<|tool_calls_section_begin|>tool call data", in_reasoning=True)
    assert parsed.reasoning_content == "some reasoning" and parsed.tool_calls == []
    assert any("tool call data" in e for e in parsed.errors)


def test_tool_call_inside_a_never_closed_think_is_a_tool_call():
    text = "<think>let me look" + _wrap(_tool("functions.get_weather:0", '{"city": "Oslo"}')) + "<|im_end|>"
    for in_reasoning in (True, False):
        parsed = parse(text, in_reasoning=in_reasoning)
        assert parsed.reasoning_content == "let me look" and parsed.errors == []
        assert _args(parsed) == [("get_weather", {"city": "Oslo"})]
        assert _stream(list(text), in_reasoning=in_reasoning)[0] == parsed


def test_thinking_disabled_is_all_content():
    parsed = parse("final answer")
    assert (parsed.reasoning_content, parsed.content) == (None, "final answer")


def test_streaming_reasoning_then_content():
    p = StreamingParser(in_reasoning=True)
    assert [e for e in p.feed("<think>") if e["text"]] == []
    assert p.feed("step one") == [{"type": "reasoning", "text": "step one"}]
    assert p.feed("</think>") == []
    assert p.feed("answer") + p.finish() == [{"type": "content", "text": "answer"}]


def test_streaming_tool_section_ends_reasoning():
    p = StreamingParser(in_reasoning=True)
    events = p.feed("<think>thinking") + p.feed(SECTION_BEGIN) + p.feed(_tool("functions.f:0", "{}") + SECTION_END)
    parsed = collect(events + p.finish())
    assert parsed.reasoning_content == "thinking" and _args(parsed) == [("f", {})]


def test_think_after_leading_whitespace():
    for text in ("\n <think>r</think>c", "  <think>r</think>c"):
        parsed = parse(text)
        assert (parsed.reasoning_content, parsed.content) == ("r", "c")
        assert _stream(list(text))[0] == parsed
    assert parse("  plain").content == "  plain"
