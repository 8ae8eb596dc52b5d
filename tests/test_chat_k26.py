"""Golden K2.6 renderings, written by reading Moonshot's K2.5/K2.6 `chat_template.jinja` and
`tokenization_kimi.py` / `tool_declaration_ts.py` (expected strings worked out by hand from those files):
thinking and non-thinking prompts, TypeScript tool declarations and their JSON fallback, tool calls, tool
results, images, names, and which turns keep their reasoning."""

import json

import pytest

from k2lab.tokenizer.chat import render, render_sft
from k2lab.tokenizer.tools_ts import tools_ts_str

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
        "city": {"type": "string", "description": "City name"}}}}}
WEATHER_TS = ('# Tools\n\n## functions\nnamespace functions {\n// Get the current weather\ntype get_weather = (_: {\n'
              '  // City name\n  city: string,\n  // Temperature unit\n  unit?: "celsius" | "fahrenheit"\n'
              '}) => any;\n}\n')


def call(i, city):
    return {"id": f"functions.get_weather:{i}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [call(0, "Paris")]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "Sunny, 21C"},
    {"role": "assistant", "content": "It is sunny.", "reasoning_content": "Report it."},
    {"role": "user", "content": "And Rome?"},
    {"role": "assistant", "content": "", "reasoning_content": "Call again.", "tool_calls": [call(1, "Rome")]},
    {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "Cloudy"},
]


def turns(paris_think, answer_think, rome_think, prompt):
    return (
        "<|im_system|>tool_declare<|im_middle|>" + WEATHER_TS + "<|im_end|>"
        "<|im_system|>system<|im_middle|>You are helpful.<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>"
        f"<|im_assistant|>assistant<|im_middle|>{paris_think}<|tool_calls_section_begin|><|tool_call_begin|>"
        'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nSunny, 21C<|im_end|>"
        f"<|im_assistant|>assistant<|im_middle|>{answer_think}It is sunny.<|im_end|>"
        "<|im_user|>user<|im_middle|>And Rome?<|im_end|>"
        f"<|im_assistant|>assistant<|im_middle|>{rome_think}<|tool_calls_section_begin|><|tool_call_begin|>"
        'functions.get_weather:1<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:1\nCloudy<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>" + prompt)


def test_thinking_drops_reasoning_up_to_the_last_plain_answer():
    assert render(CONVERSATION, [WEATHER], add_generation_prompt=True) == turns(
        "<think></think>", "<think></think>", "<think>Call again.</think>", "<think>")


def test_preserve_thinking_keeps_every_turn():
    assert render(CONVERSATION, [WEATHER], add_generation_prompt=True, preserve_thinking=True) == turns(
        "<think>Need the tool.</think>", "<think>Report it.</think>", "<think>Call again.</think>", "<think>")
    assert render(CONVERSATION, [WEATHER], add_generation_prompt=True, preserve_thinking=True, thinking=False) == \
        turns("<think>Need the tool.</think>", "<think>Report it.</think>", "<think>Call again.</think>",
              "<think></think>")


def test_non_thinking_drops_all_reasoning():
    assert render(CONVERSATION, [WEATHER], add_generation_prompt=True, thinking=False) == turns(
        "<think></think>", "<think></think>", "<think></think>", "<think></think>")


def test_plain_chat_has_no_system_turn_and_names_roles():
    msgs = [{"role": "user", "name": "alice", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render(msgs) == ("<|im_user|>alice<|im_middle|>hi<|im_end|>"
                            "<|im_assistant|>assistant<|im_middle|><think></think>hello<|im_end|>")
    assert render(msgs[:1], add_generation_prompt=True) == \
        "<|im_user|>alice<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|><think>"


def test_image_parts():
    """Each image is the media markers around one <|media_pad|>, then a newline."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                                         {"type": "text", "text": " Be brief."}]}]
    assert render(msgs, add_generation_prompt=True, thinking=False) == (
        "<|im_user|>user<|im_middle|>What is this?<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\n"
        " Be brief.<|im_end|><|im_assistant|>assistant<|im_middle|><think></think>")


SEARCH = {"type": "function", "function": {"name": "search", "description": "Search the web.\nReturns links.",
          "parameters": {
              "type": "object", "required": ["query"],
              "$defs": {"Order": {"type": "string", "enum": ["asc", "desc"], "description": "Sort order"}},
              "properties": {
                  "query": {"type": "string", "description": "What to look for", "minLength": 1, "maxLength": 200},
                  "limit": {"type": "integer", "minimum": 1, "maximum": 50, "default": 10},
                  "filters": {"type": "object", "additionalProperties": False, "properties": {
                      "site": {"type": "string"}, "lang": {"type": ["string", "null"]}}},
                  "tags": {"type": "array", "items": {"type": "string", "description": "A tag"}, "maxItems": 5},
                  "sort": {"anyOf": [{"$ref": "#/$defs/Order"}, {"type": "null"}]}}}}}
SEARCH_TS = (
    '// Sort order\ninterface Order "asc" | "desc"\n'
    "// Search the web.\n// Returns links.\n"
    "type search = (_: {\n"
    "  // What to look for\n  // maxLength: 200, minLength: 1\n  query: string,\n"
    "  filters?: {\n    lang?: string | null,\n    site?: string,\n    [k: string]: never\n  },\n"
    "  // maximum: 50, minimum: 1\n  // Default: 10\n  limit?: number,\n"
    "  sort?: Order | null,\n"
    "  // maxItems: 5\n  tags?: Array<\n    // A tag\n    string\n  >\n"
    "}) => any;")
TREE = {"type": "function", "function": {"name": "tree", "parameters": {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}}}}}
TREE_TS = ("interface parameters {\n  children?: Array<parameters>,\n  name: string\n}\n"
           "type tree = (_: parameters) => any;")
NOOP = {"type": "function", "function": {"name": "noop"}}


@pytest.mark.parametrize("tools, body", [
    ([SEARCH], SEARCH_TS), ([TREE], TREE_TS), ([NOOP], "type noop = (_: {}) => any;"),
    ([NOOP, TREE], "type noop = (_: {}) => any;\n" + TREE_TS),
])
def test_typescript_tool_declarations(tools, body):
    assert tools_ts_str(tools) == "# Tools\n\n## functions\nnamespace functions {\n" + body + "\n}\n"


def test_unconvertible_schema_falls_back_to_sorted_compact_json():
    odd = {"type": "function", "function": {"parameters": {"type": "object", "properties": {
        "q": {"description": "no type"}}}, "name": "odd"}}
    assert tools_ts_str([odd]) is None and tools_ts_str([{"type": "plugin"}]) is None
    text = render([{"role": "user", "content": "x"}], [odd])
    assert text.startswith('<|im_system|>tool_declare<|im_middle|>[{"function":{"name":"odd","parameters":'
                           '{"properties":{"q":{"description":"no type"}},"type":"object"}},"type":"function"}]'
                           "<|im_end|><|im_user|>")


def test_multi_part_text_encodes_as_the_joined_text(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello, wor"}, {"type": "text", "text": "ld!"}]}]
    joined = [{"role": "user", "content": "Hello, world!"}]
    assert render(parts) == render(joined)
    assert render_sft(tok, parts) == render_sft(tok, joined)
