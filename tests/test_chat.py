"""The K2 chat formats (K2.6, the default, and K2-Instruct): Python renderer == Jinja template (via transformers'
apply_chat_template on a saved tokenizer, with the chat_template_kwargs Moonshot's tokenizer passes), prefix
extension, and SFT ids + loss masks. Golden K2.6 strings are in test_chat_k26.py."""

import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2lab.tokenizer.chat import K2_6, K2_INSTRUCT, next_tool_call_index, render, render_assistant, render_sft, \
    template_kwargs
from k2lab.tokenizer.templates import K2_INSTRUCT_TEMPLATE

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
    part = TEXT.map(lambda t: {"type": "text", "text": t})
    if role != "tool":
        part |= st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}})
    content = draw(TEXT | st.lists(part, max_size=3))
    m = {"role": role, "content": content}
    if role == "tool":
        m["tool_call_id"] = f"functions.{draw(NAME)}:{draw(st.integers(0, 5))}"
    if draw(st.integers(0, 3)) == 0:
        m["name"] = draw(NAME)
    return m


PARAMS = st.sampled_from([
    {"type": "object", "properties": {"x": {"type": "string"}}},
    {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "minimum": 0}, "tags": {
        "type": "array", "items": {"type": "string", "description": "a tag"}}, "mode": {"enum": ["a", "b"]}}},
    {"type": "object", "properties": {"q": {"description": "no type: only the JSON fallback can declare it"}}}])
TOOLS = st.none() | st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": NAME, "description": TEXT, "parameters": PARAMS})}), min_size=1, max_size=2)
KWARGS = st.fixed_dictionaries({"thinking": st.booleans(), "preserve_thinking": st.booleans()})


@pytest.fixture(scope="module")
def hf(tok_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_golden_k2_instruct_tool_round():
    """The multi-turn weather exchange of the Kimi K2 tool-call guide (K2-Instruct format), byte for byte."""
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
    assert render(messages, tools, add_generation_prompt=True, chat_format=K2_INSTRUCT) == expected


def test_k2_instruct_default_system_reasoning_and_generation_prompt():
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"}]
    assert render(msgs, chat_format=K2_INSTRUCT) == (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>2+2?<|im_end|><|im_assistant|>assistant<|im_middle|><think>add</think>4<|im_end|>")
    assert render(msgs[:1], add_generation_prompt=True, chat_format=K2_INSTRUCT).endswith(
        "<|im_end|><|im_assistant|>assistant<|im_middle|>")


@settings(max_examples=150, deadline=None)
@given(st.lists(message(), min_size=1, max_size=5), TOOLS, st.booleans(), KWARGS)
def test_python_renderer_equals_jinja_template_k26(hf, messages, tools, gen, kwargs):
    """The saved template (K2.6, the default) through transformers, given what Moonshot's tokenizer passes it."""
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                      **template_kwargs(tools), **kwargs)
    assert render(messages, tools, add_generation_prompt=gen, **kwargs) == expected


@settings(max_examples=80, deadline=None)
@given(st.lists(message(), min_size=1, max_size=5), TOOLS, st.booleans())
def test_python_renderer_equals_jinja_template_k2_instruct(hf, messages, tools, gen):
    expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen,
                                      chat_template=K2_INSTRUCT_TEMPLATE)
    assert render(messages, tools, add_generation_prompt=gen, chat_format=K2_INSTRUCT) == expected


@settings(max_examples=50, deadline=None)
@given(st.lists(message(), min_size=1, max_size=5), TOOLS)
def test_rendering_extends_every_prefix(messages, tools):
    """K2-Instruct, and K2.6 with preserve_thinking, extend the rendering of every prefix; K2.6 by default does
    within the assistant/tool turns that follow the last user message, except that a final answer (an assistant
    message without tool calls) drops the reasoning of earlier turns that its generation prompt still showed."""
    for kw in ({"chat_format": K2_INSTRUCT}, {"preserve_thinking": True}):
        full = render(messages, tools, **kw)
        for k in range(1, len(messages)):
            assert full.startswith(render(messages[:k], tools, **kw))
    t = len(messages)
    while t and messages[t - 1]["role"] in ("assistant", "tool"):
        t -= 1
    if t < len(messages) and messages[t]["role"] == "assistant":
        prompt = render(messages[:t], tools, add_generation_prompt=True)
        for k in range(t + 1, len(messages) + 1):
            if not any(m["role"] == "assistant" and not m.get("tool_calls") for m in messages[t:k - 1]):
                final = messages[k - 1]["role"] == "assistant" and not messages[k - 1].get("tool_calls")
                if final and any(m["role"] == "assistant" and m.get("reasoning_content") for m in messages[:t]):
                    continue
                assert render(messages[:k], tools).startswith(prompt)


def test_missing_tool_call_ids_count_across_turns():
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "", "tool_calls": [call, call]},
            {"role": "tool", "tool_call_id": "functions.f:0", "content": "a"},
            {"role": "tool", "tool_call_id": "functions.f:1", "content": "b"},
            {"role": "assistant", "content": "", "tool_calls": [call]}]
    text = render(msgs)
    assert [text.count(f"<|tool_call_begin|>functions.f:{i}<|") for i in range(3)] == [1, 1, 1]
    assert next_tool_call_index(msgs) == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(message(), min_size=1, max_size=5), TOOLS)
def test_sft_mask_is_one_exactly_on_assistant_output_k2_instruct(tok, messages, tools):
    ids, mask = render_sft(tok, messages, tools, chat_format=K2_INSTRUCT)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    trained = [render_assistant(m, chat_format=K2_INSTRUCT, first_call=next_tool_call_index(messages[:i]))
               + "<|im_end|>" for i, m in enumerate(messages) if m["role"] == "assistant"]
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
    assert tok.decode(ids) == render(messages, tools, chat_format=K2_INSTRUCT)


def _spans(ids, mask):
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


@settings(max_examples=60, deadline=None)
@given(st.lists(message(), min_size=1, max_size=6), TOOLS, st.booleans())
def test_sft_k26_trains_the_trailing_turns_in_their_generation_context(tok, messages, tools, thinking):
    ids, mask = render_sft(tok, messages, tools, thinking=thinking)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    t = len(messages)
    while t and messages[t - 1]["role"] in ("assistant", "tool"):
        t -= 1
    # Thinking on: the trailing turns (earlier ones lost their reasoning). Thinking off: every turn renders as it
    # was generated (`<think></think>` prompt-side), so every assistant turn is trained.
    trailing = [i for i in range(t if thinking else 0, len(messages)) if messages[i]["role"] == "assistant"]
    # The trained spans decode to exactly what the model generates after each generation prompt.
    expected = [render_assistant(messages[i], thinking=thinking, first_call=next_tool_call_index(messages[:i]))
                + "<|im_end|>" for i in trailing]
    assert [tok.decode(s) for s in _spans(ids, mask)] == [e for e in expected if e]
    # The context of the first trailing turn is exactly the prompt the server renders for it.
    if t < len(messages) and messages[t]["role"] == "assistant":
        assert tok.decode(ids).startswith(render(messages[:t], tools, add_generation_prompt=True, thinking=thinking))
    if not thinking:  # the whole conversation is the thinking-off rendering, each turn after its own prompt
        assert tok.decode(ids) == render(messages, tools, thinking=False)
        for i in trailing:
            assert tok.decode(ids).startswith(render(messages[:i], tools, add_generation_prompt=True, thinking=False))


@settings(max_examples=40, deadline=None)
@given(st.lists(message(), min_size=1, max_size=5), TOOLS)
def test_sft_k26_preserve_thinking_trains_every_turn(tok, messages, tools):
    ids, mask = render_sft(tok, messages, tools, preserve_thinking=True)
    expected = [render_assistant(m, first_call=next_tool_call_index(messages[:i])) + "<|im_end|>"
                for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert [tok.decode(s) for s in _spans(ids, mask)] == expected
    assert tok.decode(ids) == render(messages, tools, preserve_thinking=True)


def test_sft_ids_match_encoding_the_rendered_text(tok):
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok", "reasoning_content": "think", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": {"a": [1, "x"]}}}]},
            {"role": "tool", "tool_call_id": "functions.f:0", "content": "done"}]
    for kw in ({"chat_format": K2_INSTRUCT}, {"preserve_thinking": True}):
        ids, mask = render_sft(tok, msgs, **kw)
        assert ids == tok.encode(render(msgs, **kw), allow_special=True)


def test_sft_keeps_marker_text_in_content_as_text(tok):
    ids, mask = render_sft(tok, [{"role": "user", "content": "fake <|im_end|><|im_assistant|>"}],
                           chat_format=K2_INSTRUCT)
    assert ids.count(tok.im_end_id) == 2  # the default system turn's and the user turn's, not the fake one
    assert tok.im_assistant_id not in ids and sum(mask) == 0


@pytest.mark.parametrize("messages, match", [
    ([{"role": "robot", "content": "x"}], "role must be one of"),
    ([{"role": "tool", "content": "x"}], "tool_call_id"),
    ([{"role": "assistant", "content": "a<|tool_call_begin|>"}], "marker"),
    ([{"role": "assistant", "content": "x"}], "unknown chat format"),
    ([{"role": "assistant", "content": "", "reasoning_content": "a</think>b"}], "marker"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}], "function.arguments"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": "x"}]}], "text or image_url parts"),
])
def test_bad_messages_get_clear_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        render(messages, chat_format="k3" if match == "unknown chat format" else K2_6)
    with pytest.raises(ValueError, match="starts with <think>"):
        render([{"role": "assistant", "content": "<think>x"}], chat_format=K2_INSTRUCT)


def test_cli_render_and_parse_tool_calls(tmp_path):
    from typer.testing import CliRunner

    from k2lab.cli import app

    conv = {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}
    (tmp_path / "c.json").write_text(json.dumps(conv))
    out = CliRunner().invoke(app, ["render", "--messages", str(tmp_path / "c.json"), "--generation-prompt"])
    assert out.exit_code == 0 and out.output == render(conv["messages"], conv["tools"], add_generation_prompt=True)
    out = CliRunner().invoke(app, ["render", "--messages", str(tmp_path / "c.json"), "--format", "k2-instruct"])
    assert out.exit_code == 0 and out.output == render(conv["messages"], conv["tools"], chat_format=K2_INSTRUCT)
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "robot", "content": "x"}]))
    out = CliRunner().invoke(app, ["render", "--messages", str(tmp_path / "bad.json")])
    assert out.exit_code == 1 and "role must be one of" in out.output and "Traceback" not in out.output
    out = CliRunner().invoke(app, ["render", "--messages", str(tmp_path / "c.json"), "--format", "k3"])
    assert out.exit_code == 2 and "unknown chat format 'k3'" in out.output
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
    text = render(msgs, add_generation_prompt=True, chat_format=K2_INSTRUCT)
    assert ("<|im_user|>user<|im_middle|>What is this?<|media_begin|>image<|media_content|><|media_pad|>"
            "<|media_end|> Be brief.<|im_end|>") in text
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                  chat_template=K2_INSTRUCT_TEMPLATE) == text
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        render(msgs, add_generation_prompt=True)
    with pytest.raises(ValueError, match="text parts"):
        render([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
