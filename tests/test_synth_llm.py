"""The LLM path of `k2lab synth` end to end against the scripted OpenAI-compatible server (a test double playing
tool designer, task writer, user, tool simulator, teacher and judges, malformed replies included; see
k2lab/testing/synth_script.py), with `mcp-server-time` from PyPI as a real MCP server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from k2lab.runs import read_jsonl
from k2lab.synth.checks import roundtrip_errors, schema_errors
from k2lab.synth.specs import SpecError, dedupe, from_json_file, validate_tool
from k2lab.synth.stages import main
from k2lab.testing.scripted_server import Faults, ScriptedServer
from k2lab.testing.synth_script import CASES, handler

TIME_SERVER = f"{sys.executable} -m mcp_server_time --local-timezone UTC"
TOOLS_FILE = [{"type": "function", "function": {"name": "weather_get", "description": "Get the weather forecast.",
                                                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                                "required": ["city"]}}},
              {"type": "function", "function": {"name": "bad name!", "description": "x", "parameters": {"type": "object"}}}]


@pytest.fixture
def tools_file(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(TOOLS_FILE))
    return str(path)


def test_spec_validation_and_dedupe(tools_file):
    ok, bad = from_json_file(tools_file)
    assert [t["name"] for t in ok] == ["weather_get"] and "bad name!" in bad[0]["reason"]
    with pytest.raises(SpecError, match="invalid JSON schema"):
        validate_tool({"name": "x", "description": "d", "parameters": {"type": "object",
                                                                       "properties": {"a": {"type": 3}}}}, "json", "d")
    with pytest.raises(SpecError, match="type object"):
        validate_tool({"name": "x", "description": "d", "parameters": {"type": "string"}}, "json", "d")
    a = validate_tool({"name": "get_weather", "description": "Get the weather forecast for a city."}, "json", "d")
    b = validate_tool({"name": "weather_get", "description": "Get the weather forecast for a city."}, "json", "d")
    c = validate_tool({"name": "send_email", "description": "Send an email to a recipient."}, "json", "d")
    kept, dropped = dedupe([a, b, c])
    assert [t["name"] for t in kept] == ["get_weather", "send_email"] and "near-duplicate" in dropped[0]["reason"]


def test_llm_path_end_to_end_with_malformed_replies_and_real_mcp(tmp_path, tools_file):
    out = tmp_path / "run"
    with ScriptedServer(handler, faults=Faults(0.15, kinds=("429", "500"), seed=1)) as srv:
        card = main(out, srv.base_url, "k", "scripted", ["judge-a", "judge-b"], [TIME_SERVER], [tools_file],
                    ["travel", "broken", "truncated"], len(CASES), 4, 0.0, 0, False, backoff=(0.01, 0.05),
                    price_per_mtok=(1.0, 2.0))
        assert srv.stats.faults["429"] + srv.stats.faults["500"] > 0
    tools = {t["name"]: t for t in read_jsonl(out / "tools.jsonl")}
    assert {t["source"] for t in tools.values()} == {"mcp", "json", "synthetic"}
    assert {"get_current_time", "convert_time", "weather_get", "travel_desk_book"} <= set(tools)
    assert not any(n.endswith(("_broken", "_book_item")) for n in tools)  # invalid schema, near-duplicate
    reasons = " | ".join(r["reason"] for r in read_jsonl(out / "stages.jsonl")[0]["rejected"])
    for why in ("bad name!", "invalid JSON schema", "near-duplicate", "domains of broken: reply is not JSON",
                "domains of truncated: reply truncated"):
        assert why in reasons
    task_recs = read_jsonl(out / "tasks.jsonl")
    assert any("not JSON" in r["reason"] for a in task_recs for r in a["rejected"])  # the flaky writer, retried
    n_agents = len(task_recs)
    assert n_agents == 4 and all(len(a["tasks"]) == len(CASES) for a in task_recs)
    kept, rejected, queue = (read_jsonl(out / f"{n}.jsonl") for n in ("kept", "rejected", "queue"))
    case = lambda r: r["goal"].split("]")[0][1:]  # noqa: E731
    assert sorted(map(case, kept)) == ["ok"] * n_agents
    assert sorted(map(case, queue)) == sorted(["unsure", "split"] * n_agents)
    by_case = {c: [r for r in rejected if case(r) == c] for c in ("bad-args", "truncated", "fail")}
    assert all(len(v) == n_agents for v in by_case.values())
    assert all("truncated" in r["reasons"][0] for r in by_case["truncated"])
    assert all(r["reasons"][0].startswith("tool_schemas") for r in by_case["bad-args"])
    assert all(r["reasons"] == ["judges: reject"] for r in by_case["fail"])
    for r in kept:
        assert roundtrip_errors(r["messages"], r["tools"]) == [] and schema_errors(r["messages"], r["tools"]) == []
        assert len([v for v in r["verdicts"] if v["checkpoint"] == "rubric"]) == 2 and r["rubric"]["checkpoints"]
        assert r["ended"] == "goal met" and r["stats"]["turns"] == 2  # the simulated user asked a follow-up
    mcp_run = next(r for r in kept if r["tool_source"] == "mcp")
    assert mcp_run["stats"]["executed"]["mcp"] >= 1
    real = json.loads(next(m["content"] for m in mcp_run["messages"] if m["role"] == "tool"))
    assert real["timezone"] == "UTC" and "datetime" in real  # executed by mcp-server-time itself
    assert any(r["stats"]["executed"]["simulated"] for r in kept)
    stages = card["stages"]
    assert stages["rollout"]["usage"]["teacher"]["calls"] > 0 and stages["tasks"]["usage"]["completion_tokens"] > 0
    assert stages["rollout"]["usage"]["teacher"]["cost_usd"] > 0 and stages["judges"]["usage_this_session"]["calls"] > 0
    assert card["totals"] == {"trajectories": 6 * n_agents, "kept": n_agents, "rejected": 3 * n_agents,
                              "queued": 2 * n_agents, "acceptance_rate": round(1 / 6, 4)}
    assert {p["source"] for p in card["tool_map"]["points"]} == {"mcp", "json", "synthetic"}


def test_llm_path_kill_and_resume(tmp_path, tools_file):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "k2lab.cli", "synth", "--out", str(out), "--categories", "travel,shop",
            "--tools-file", tools_file, "--tasks-per-agent", str(len(CASES)), "--concurrency", "2",
            "--fault-rate", "0", "--price-per-mtok", "0.5,1.5"]
    with ScriptedServer(handler, latency=0.03) as srv:
        env = {**os.environ, "K2LAB_BASE_URL": srv.base_url, "K2LAB_API_KEY": "k", "K2LAB_MODEL": "scripted"}
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if sum(len(read_jsonl(out / f"{n}.jsonl")) for n in ("kept", "rejected", "queue")) >= 4:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = [r["task_id"] for n in ("kept", "rejected", "queue") for r in read_jsonl(out / f"{n}.jsonl")]
        tasks_before = read_jsonl(out / "tasks.jsonl")
        r = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    all_tasks = [t["task_id"] for a in read_jsonl(out / "tasks.jsonl") for t in a["tasks"]]
    after = [r["task_id"] for n in ("kept", "rejected", "queue") for r in read_jsonl(out / f"{n}.jsonl")]
    assert 0 < len(before) < len(all_tasks), "the run must be killed part-way"
    assert len(after) == len(set(after)) and sorted(after) == sorted(all_tasks)  # nothing lost, nothing twice
    agents = [a["agent_id"] for a in read_jsonl(out / "tasks.jsonl")]
    assert len(agents) == len(set(agents)) == 5 and read_jsonl(out / "tasks.jsonl")[:len(tasks_before)] == tasks_before


def test_tool_simulator_outcomes_at_configured_rates():
    import asyncio

    from k2lab.agents.llm import LLM
    from k2lab.synth.simulate import SimulatedEnvironment

    spec = validate_tool({"name": "shop_book", "description": "Book an item.", "parameters": {
        "type": "object", "properties": {"item_id": {"type": "string"}}, "required": ["item_id"]}}, "synthetic", "shop")
    task = {"task_id": "t0", "goal": "[ok] book things", "persona": "terse"}
    agent = {"system": "You are an assistant for shop.", "tools": ["shop_book"]}
    with pytest.raises(ValueError, match="outcome_rates"):
        SimulatedEnvironment(task, agent, {"shop_book": spec}, None, None, outcome_rates={"explode": 0.1})

    async def go():
        llm = LLM(srv.base_url, "k", "scripted")
        env = SimulatedEnvironment(task, agent, {"shop_book": spec}, llm, llm, fault_rate=0.0, seed=3, max_steps=200,
                                   outcome_rates={"partial": 0.3, "edge_case": 0.2})
        await env.reset()
        calls = [{"id": f"functions.shop_book:{i}", "type": "function",
                  "function": {"name": "shop_book", "arguments": json.dumps({"item_id": str(i)})}} for i in range(60)]
        obs, _, _ = await env.step({"role": "assistant", "content": None, "tool_calls": calls})
        await llm.aclose()
        return env, obs
    with ScriptedServer(handler) as srv:
        env, obs = asyncio.run(go())
    outcomes = [c["outcome"] for c in env.calls]
    counts = {k: outcomes.count(k) for k in ("success", "partial", "edge_case")}
    assert 18 <= counts["success"] <= 42 and 8 <= counts["partial"] <= 28 and 4 <= counts["edge_case"] <= 22, counts
    told = [json.loads(o["content"])["outcome"] for o in obs]  # the simulator was told which outcome to play
    assert [t.split()[-1] for t in told] == [{"success": "success", "partial": "failure", "edge_case": "case"}[k]
                                             for k in outcomes]
