"""Strict tools and json_schema response formats are enforced while decoding (llguidance): with random weights,
every sampled tool call / JSON answer validates against its schema."""

import asyncio
import json

import jsonschema
import openai
import pytest

from k2lab.model import K2ForCausalLM
from k2lab.serve.engine import Engine
from k2lab.serve.server import Server
from k2lab.tokenizer import train_tokenizer
from tests.serve_helpers import VOCAB, serve_in_thread, tiny_model_config

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days", "unit", "alerts"],
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "days": {"type": "integer", "minimum": 1, "maximum": 14},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                          "alerts": {"type": "boolean"}}}
SEARCH = {"type": "object", "additionalProperties": False, "required": ["query", "tags"],
          "properties": {"query": {"type": "string", "maxLength": 10},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "search", "parameters": SEARCH, "strict": True}}]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}


@pytest.fixture(scope="module")
def url():
    tok = train_tokenizer(VOCAB, max_bytes=300_000)
    model = K2ForCausalLM(tiny_model_config(tok)).eval()  # random weights
    engine = Engine(model, tok.id_to_bytes, (tok.eos_id, tok.im_end_id), max_len=1024, max_slots=32)
    with serve_in_thread(Server(engine, tok, "random")) as base:
        yield base


def run_all(url, requests):
    async def go():
        c = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        # thinking off: a random model would wander in its reasoning until max_tokens before any call
        return await asyncio.gather(*(c.chat.completions.create(
            model="random", extra_body={"chat_template_kwargs": {"thinking": False}}, **r) for r in requests))
    return asyncio.run(go())


def test_100_strict_tool_calls_validate(url):
    msgs = [{"role": "user", "content": "Weather in Paris for three days, or search the web?"}]
    out = run_all(url, [dict(messages=msgs, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                             temperature=1.0, seed=i, max_tokens=200) for i in range(100)])
    names = set()
    for r in out:
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        names.add(call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        assert call.id.startswith(f"functions.{call.function.name}:")
    assert names == {"get_weather", "search"}  # sampling really chose between the tools


def test_named_tool_choice_and_parallel_calls(url):
    msgs = [{"role": "user", "content": "Search."}]
    out = run_all(url, [dict(messages=msgs, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}},
                             temperature=1.0, seed=i, max_tokens=300) for i in range(10)])
    done = [r for r in out if r.choices[0].finish_reason != "length"]  # parallel calls may pass max_tokens
    assert len(done) >= 5
    for r in done:
        assert r.choices[0].finish_reason == "tool_calls"
        for call in r.choices[0].message.tool_calls:
            assert call.function.name == "search"
            jsonschema.validate(json.loads(call.function.arguments), SEARCH)


def test_response_format_json_schema(url):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    out = run_all(url, [dict(messages=[{"role": "user", "content": "JSON please"}], response_format=fmt,
                             temperature=1.0, seed=i, max_tokens=200) for i in range(20)])
    for r in out:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)


def test_invalid_schema_is_a_400(url):
    c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    bad = [{"type": "function", "function": {"name": "f", "strict": True,
                                             "parameters": {"type": "object", "properties": {"a": {"type": 12}}}}}]
    with pytest.raises(openai.BadRequestError, match="invalid schema"):
        c.chat.completions.create(model="random", messages=[{"role": "user", "content": "x"}], tools=bad)


def test_forced_calls_follow_the_schema_of_non_strict_tools(url):
    """tool_choice required / named holds the arguments to the tool's schema even without strict (chat and
    the Responses API)."""
    loose = [{"type": "function", "function": {"name": t["function"]["name"], "parameters": t["function"]["parameters"]}}
             for t in TOOLS]
    msgs = [{"role": "user", "content": "Weather or search?"}]
    out = run_all(url, [dict(messages=msgs, tools=loose, tool_choice="required", parallel_tool_calls=False,
                             temperature=1.0, seed=i, max_tokens=200) for i in range(20)])
    for r in out:
        (call,) = r.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    for i in range(5):
        resp = c.responses.create(model="random", input="Search.", temperature=1.0, max_output_tokens=200,
                                  reasoning={"effort": "none"},  # no thinking: see run_all
                                  tools=[{"type": "function", **t["function"]} for t in loose],
                                  tool_choice={"type": "function", "name": "search"})
        calls = [o for o in resp.output if o.type == "function_call"]
        assert calls and all(o.name == "search" for o in calls)
        for o in calls:
            jsonschema.validate(json.loads(o.arguments), SEARCH)
