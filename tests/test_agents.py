"""Tools and the agent loop. Model decisions come from the scripted server: a real OpenAI-compatible HTTP server
on loopback that plays back scripted replies (a test double for the model; the agent code is under test)."""

import asyncio
import json
import time
from typing import Literal

import pytest

from k2lab.agents.agent import Agent, AgentLimits, estimate_tokens, fit_context
from k2lab.agents.llm import LLM
from k2lab.agents.sandbox import Limits, Sandbox
from k2lab.agents.tools import tool, workspace_tools
from k2lab.agents.trace import read_spans, Tracer
from k2lab.testing.scripted_server import ScriptedServer


@tool
def scale(x: float, factor: int = 2, unit: Literal["m", "s"] = "m") -> str:
    """Scale a value."""
    return f"{x * factor}{unit}"


def test_schema_from_type_hints_and_validation_errors_are_results():
    spec = scale.spec["function"]
    assert spec["name"] == "scale" and spec["description"] == "Scale a value."
    props = spec["parameters"]["properties"]
    assert props["x"]["type"] == "number" and props["factor"]["default"] == 2 and props["unit"]["enum"] == ["m", "s"]
    assert spec["parameters"]["required"] == ["x"]
    assert asyncio.run(scale('{"x": 1.5}')) == "3.0m"
    assert "x: Field required" in asyncio.run(scale("{}"))
    assert "unit: Input should be 'm' or 's'" in asyncio.run(scale('{"x": 1, "unit": "kg"}'))
    assert "extra" in asyncio.run(scale('{"x": 1, "y": 2}')).lower()
    assert "not valid JSON" in asyncio.run(scale('{"x": '))

    @tool
    def boom(n: int) -> int:
        raise RuntimeError("kaput")
    assert asyncio.run(boom('{"n": 1}')) == "error: boom raised RuntimeError: kaput"
    with pytest.raises(TypeError, match="type hint"):
        tool(lambda a: a)


def test_workspace_file_tools_stay_inside(tmp_path):
    tools = {t.name: t for t in workspace_tools(Sandbox(tmp_path / "ws", Limits(wall_s=5)))}
    assert "wrote 2 chars" in asyncio.run(tools["write_file"]('{"path": "a/b.txt", "content": "hi"}'))
    assert asyncio.run(tools["read_file"]('{"path": "a/b.txt"}')) == "hi"
    assert asyncio.run(tools["list_files"]("{}")) == "a/\na/b.txt"
    for bad in ("../x.txt", "/etc/passwd", "a/../../x"):
        out = asyncio.run(tools["write_file"](json.dumps({"path": bad, "content": "x"})))
        assert out.startswith("error:") and "outside the workspace" in out
    (tmp_path / "ws" / "link").symlink_to("/etc")
    assert "outside the workspace" in asyncio.run(tools["read_file"]('{"path": "link/hostname"}'))
    assert "outcome: ok" in asyncio.run(tools["run_python"]('{"code": "print(6 * 7)"}'))


def scripted(replies):
    """Handler that answers the agent's step N with replies[N]."""
    return lambda req: replies[min(req.step, len(replies) - 1)]


def make_agent(srv, tools, limits=AgentLimits(), tracer=None):
    return Agent("a", LLM(base_url=srv.base_url, api_key="k", model="m"), "sys", tools, limits, tracer)


def test_parallel_tool_calls_run_concurrently(tmp_path):
    running, peak = 0, 0

    @tool
    async def slow(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.3)
        running -= 1
        return i * 10

    calls = [{"name": "slow", "arguments": {"i": i}} for i in range(8)]
    with ScriptedServer(scripted([{"tool_calls": calls}, {"content": "done"}])) as srv:
        tracer = Tracer(tmp_path / "trace.jsonl")
        res = asyncio.run(make_agent(srv, [slow], tracer=tracer).run("go"))
        tracer.close()
    assert res.outcome == "completed" and res.output == "done" and res.tool_calls == 8
    assert [m["content"] for m in res.messages if m["role"] == "tool"] == [str(i * 10) for i in range(8)]
    spans = read_spans(tmp_path)
    tool_spans = [s for s in spans if s["kind"] == "tool"]
    window = max(s["start"] + s["dur_s"] for s in tool_spans) - min(s["start"] for s in tool_spans)
    assert len(tool_spans) == 8 and all(s["dur_s"] >= 0.3 for s in tool_spans)
    assert peak == 8 and window < 0.3 * 2, f"8 x 0.3 s tools spanned {window:.2f}s, peak concurrency {peak}"
    agent_span = next(s for s in spans if s["kind"] == "agent")
    assert all(s["parent"] == agent_span["id"] for s in tool_spans)


@tool
def probe(q: str) -> str:
    """Look something up."""
    return f"result for {q}"


@pytest.mark.parametrize("limits,reason", [
    (AgentLimits(max_steps=3), "max_steps 3 reached"),
    (AgentLimits(max_tool_calls=5), "tool call limit reached (4 done, 2 more asked)"),
    (AgentLimits(max_tokens=50), "max_tokens 50 reached"),
])
def test_limits_stop_cleanly_with_partial_result(limits, reason):
    def endless(req):  # never answers; calls two tools per step with new arguments each time
        return {"content": f"working on step {req.step}",
                "tool_calls": [{"name": "probe", "arguments": {"q": f"{req.step}-{j}"}} for j in range(2)]}
    with ScriptedServer(endless) as srv:
        res = asyncio.run(make_agent(srv, [probe], limits).run("go"))
    assert res.outcome == "stopped" and res.reason.startswith(reason)
    assert res.output.startswith("working on step")  # the partial result


def test_an_output_cut_at_max_tokens_stops_the_agent_instead_of_completing_it():
    """A reply that ran into max_tokens is no answer (a tool call cut there is dropped by the server, leaving
    nothing): the agent stops and says why, keeping the partial text; after tool calls the same holds."""
    cut = {"content": "The new levels are", "finish_reason": "length"}
    for replies in ([cut], [{"tool_calls": [{"name": "probe", "arguments": {"q": "x"}}]}, cut]):
        with ScriptedServer(scripted(replies)) as srv:
            res = asyncio.run(make_agent(srv, [probe]).run("go"))
        assert res.outcome == "stopped" and "cut at max_tokens" in res.reason, res
        assert res.output == "The new levels are" and res.steps == len(replies)
    with ScriptedServer(scripted([{"content": "The new levels are 48 and 3."}])) as srv:
        assert asyncio.run(make_agent(srv, [probe]).run("go")).outcome == "completed"


def test_wall_time_limit_and_hanging_tool():
    @tool
    async def hang() -> str:
        await asyncio.sleep(60)
        return "never"
    with ScriptedServer(scripted([{"tool_calls": [{"name": "hang", "arguments": {}}]}])) as srv:
        t0 = time.perf_counter()
        res = asyncio.run(make_agent(srv, [hang], AgentLimits(max_wall_s=0.5)).run("go"))
    assert res.outcome == "timed_out" and time.perf_counter() - t0 < 3


def test_repeated_identical_calls_get_reminders_then_stop():
    same = {"tool_calls": [{"name": "probe", "arguments": {"q": "same"}}]}
    with ScriptedServer(scripted([same])) as srv:
        res = asyncio.run(make_agent(srv, [probe], AgentLimits(max_repeats=3)).run("go"))
    tool_msgs = [m["content"] for m in res.messages if m["role"] == "tool"]
    assert res.outcome == "stopped" and "repeated identical tool call probe 4 times" in res.reason
    assert "already made" not in tool_msgs[0]
    assert "already made 1 time" in tool_msgs[1] and "last warning" in tool_msgs[2]


def test_unknown_tool_and_bad_arguments_go_back_to_the_model():
    replies = [{"tool_calls": [{"name": "nope", "arguments": {}}, {"name": "probe", "arguments": {"q": 3}}]},
               {"content": "recovered"}]
    with ScriptedServer(scripted(replies)) as srv:
        res = asyncio.run(make_agent(srv, [probe]).run("go"))
    outs = [m["content"] for m in res.messages if m["role"] == "tool"]
    assert res.outcome == "completed" and res.output == "recovered"
    assert outs[0].startswith("error: no tool named 'nope'") and "q: Input should be a valid string" in outs[1]


def test_context_budget_truncates_oldest_tool_results_and_says_so():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    for i in range(6):
        messages += [{"role": "assistant", "content": None, "tool_calls": []},
                     {"role": "tool", "tool_call_id": str(i), "content": f"{i}" * 4000}]
    n = fit_context(messages, budget=3000)
    tool_texts = [m["content"] for m in messages if m["role"] == "tool"]
    assert n >= 3 and all(t.startswith("[k2lab: truncated 4000 chars") for t in tool_texts[:n])
    assert tool_texts[-1] == "5" * 4000  # the newest result is kept
    assert estimate_tokens(messages) <= 3000


def test_endpoint_failure_fails_the_agent_not_the_process():
    with ScriptedServer(lambda req: 1 / 0) as srv:  # the handler raises: the server answers 400
        res = asyncio.run(make_agent(srv, [probe]).run("go"))
    assert res.outcome == "failed" and "BadRequestError" in res.reason
