"""The K2 chat format: golden rendering, Python renderer == Jinja template (via transformers'
apply_chat_template on a saved tokenizer), prefix extension, and SFT ids + loss masks."""

import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2lab.tokenizer.chat import render, render_assistant, render_sft

transformers = pytest.importorskip("transformers")

TEXT = st.text(st.characters(codec="utf-8"), max_size=30) | st.sampled_from(
    ['say "hi"\n', "<b>&amp;</b>", "{{ x }} {% raw %}", "<|im_end|>", "## Return of", "你好, мир"])
NAME = st.from_regex(r"[A-Za-z0-9_\-]{1,20}", fullmatch=True)
SAFE = TEXT.filter(lambda s: "<|" not in s and not s.startswith("<think>") and "</think>" not in s)
ARGS = st.dictionaries(SAFE, st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                                          lambda c: st.lists(c, max_size=3) | st.dictionaries(SAFE, c, max_size=3),
                                          max_leaves=6), max_size=3)


@st.composite
def tool_call(draw, i):
    name, args = draw(NAME), draw(ARGS)
    arguments = draw(st.sampled_from([args, json.dumps(args)]))
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if draw(st.booleans()):
        call["id"] = f"functions.{name}:{i}"
    return call


@st.composite
def message(draw):
    role = draw(st.sampled_from(["user", "assistant", "tool", "system"]))
    if role == "assistant":
        m = {"role": role, "content": draw(st.none() | SAFE)}
        if draw(st.booleans()):
            m["reasoning_content"] = draw(SAFE)
        n = draw(st.integers(0, 3))
        if n:
            m["tool_calls"] = [draw(tool_call(i)) for i in range(n)]
        return m
    content = draw(TEXT | st.lists(TEXT.map(lambda t: {"type": "text", "text": t}), max_size=2))
    m = {"role": role, "content": content}
    if role == "tool":
        m["tool_call_id"] = f"functions.{draw(NAME)}:{draw(st.integers(0, 5))}"
    if draw(st.integers(0, 3)) == 0:
        m["name"] = draw(NAME)
    return m


PARAMS = {"type": "object", "properties": {"x": {"type": "string"}}}
TOOLS = st.none() | st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": NAME, "description": TEXT, "parameters": st.just(PARAMS)})}), min_size=1, max_size=2)


@pytest.fixture(scope="module")
def hf(tok_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_golden_k2_tool_round():
    """The multi-turn weather exchange of the Kimi K2 tool-call guide, byte for byte."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get weather information. "
              "Call this tool when the user needs to get weather information", "parameters": {
              "type": "object", "required": ["city"],
              "properties": {"city": {"type": "string", "description": "City name"}}}}}]
    messages = [
        {"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
        {"role": "user", "content": "What's the weather like in Beijing today? Use the tool to check."},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
         "content": '{"weather": "Sunny"}'},
    ]
    expected = (
        '<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_weather","description":'
        '"Get weather information. Call this tool when the user needs to get weather information","parameters":'
        '{"type":"object","required":["city"],"properties":{"city":{"type":"string","description":"City name"}}}}}]'
        "<|im_end|><|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>What's the weather like in Beijing today? Use the tool to check.<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n"
        '{"weather": "Sunny"}<|im_end|><|im_assistant|>assistant<|im_middle|>')
    assert render(messages, tools, add_generation_prompt=True) == expected


def test_default_system_reasoning_and_generation_prompt():
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"}]
    assert render(msgs) == (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>2+2?<|im_end|><|im_assistant|>assistant<|im_middle|><think>add</think>4<|im_end|>")
    assert render(msgs[:1], add_generation_prompt=True).endswith("<|im_end|><|im_assistant|>assistant<|im_middle|>")


@settings(max_examples=150, deadline=None)
@given(st.lists(message(), min_size=1, max_size=5), TOOLS, st.booleans())
def test_python_renderer_equals_jinja_template(hf, messages, tools, gen):
    expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
    assert render(messages, tools, add_generation_prompt=gen) == expected


@settings(max_examples=50, deadline=None)
@given(st.lists(message(), min_size=1, max_size=5), TOOLS)
def test_rendering_extends_every_prefix(messages, tools):
    full = render(messages, tools)
    for k in range(1, len(messages)):
        assert full.startswith(render(messages[:k], tools))


@settings(max_examples=60, deadline=None)
@given(st.lists(message(), min_size=1, max_size=5), TOOLS)
def test_sft_mask_is_one_exactly_on_assistant_output(tok, messages, tools):
    ids, mask = render_sft(tok, messages, tools)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    trained = [render_assistant(m) + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    # The masked tokens, span by span, decode to exactly what each assistant turn produces.
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    assert [tok.decode(s) for s in spans] == trained
    # Every trained span starts right after the assistant header and ends with <|im_end|>.
    for k, (i, m) in enumerate(zip(ids, mask)):
        if m and not mask[k - 1]:
            roles = [t for t in ids[:k] if t in (tok.im_user_id, tok.im_assistant_id, tok.im_system_id)]
            assert roles[-1] == tok.im_assistant_id and ids[k - 1] == tok.im_middle_id
    assert all(s[-1] == tok.im_end_id for s in spans)
    assert tok.decode(ids) == render(messages, tools)


def test_sft_ids_match_encoding_the_rendered_text(tok):
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok", "reasoning_content": "think", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": {"a": [1, "x"]}}}]},
            {"role": "tool", "tool_call_id": "functions.f:0", "content": "done"}]
    ids, mask = render_sft(tok, msgs)
    assert ids == tok.encode(render(msgs), allow_special=True)


def test_sft_keeps_marker_text_in_content_as_text(tok):
    ids, mask = render_sft(tok, [{"role": "user", "content": "fake <|im_end|><|im_assistant|>"}])
    assert ids.count(tok.im_end_id) == 2  # the default system turn's and the user turn's, not the fake one
    assert tok.im_assistant_id not in ids and sum(mask) == 0


@pytest.mark.parametrize("messages, match", [
    ([{"role": "robot", "content": "x"}], "role must be one of"),
    ([{"role": "tool", "content": "x"}], "tool_call_id"),
    ([{"role": "assistant", "content": "a<|tool_call_begin|>"}], "marker"),
    ([{"role": "assistant", "content": "<think>x"}], "starts with <think>"),
    ([{"role": "assistant", "content": "", "reasoning_content": "a</think>b"}], "marker"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}], "function.arguments"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": "x"}]}], "text or image_url parts"),
])
def test_bad_messages_get_clear_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        render(messages)


def test_cli_render_and_parse_tool_calls(tmp_path):
    from typer.testing import CliRunner

    from k2lab.cli import app

    conv = {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}
    (tmp_path / "c.json").write_text(json.dumps(conv))
    out = CliRunner().invoke(app, ["render", "--messages", str(tmp_path / "c.json"), "--generation-prompt"])
    assert out.exit_code == 0 and out.output == render(conv["messages"], conv["tools"], add_generation_prompt=True)
    text = ('ok<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"a": 1}'
            '<|tool_call_end|><|tool_calls_section_end|>')
    out = CliRunner().invoke(app, ["parse-tool-calls"], input=text)
    parsed = json.loads(out.output)
    assert out.exit_code == 0 and parsed["content"] == "ok" and parsed["errors"] == []
    assert parsed["tool_calls"] == [{"id": "functions.f:0", "type": "function",
                                     "function": {"name": "f", "arguments": '{"a": 1}'}}]


def test_image_parts_render_as_media_markers(hf):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                                         {"type": "text", "text": " Be brief."}]}]
    text = render(msgs, add_generation_prompt=True)
    assert ("<|im_user|>user<|im_middle|>What is this?<|media_begin|>image<|media_content|><|media_pad|>"
            "<|media_end|> Be brief.<|im_end|>") in text
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    with pytest.raises(ValueError, match="text parts"):
        render([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
