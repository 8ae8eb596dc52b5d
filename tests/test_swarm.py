"""Agent Swarm against the scripted server: a real OpenAI-compatible HTTP server on loopback that plays back the
decisions of an orchestrator and its workers (tests/swarm_script.py; a test double for the model)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time


from k2lab.agents.agent import AgentLimits
from k2lab.agents.llm import LLM
from k2lab.agents.swarm import ORCHESTRATOR_PROMPT, Swarm, SwarmLimits
from k2lab.agents.tools import tool
from k2lab.agents.trace import read_spans, render_tree
from k2lab.runs import read_jsonl
from k2lab.testing.scripted_server import Faults, ScriptedServer
from k2lab.testing.swarm_script import expected, handler, lookup, plan
from tests.conftest import side_by_side


def run_swarm(srv, run_dir, tools, limits=SwarmLimits(), **llm_kw):
    async def go():
        async with LLM(base_url=srv.base_url, api_key="k", model="m", **llm_kw) as llm:
            return await Swarm(llm, lambda run_dir, name: tools, limits).run("sum all entries", run_dir)
    return asyncio.run(go())


def test_300_subagents_4000_tool_calls(tmp_path):
    counts = plan(300, 4000)
    total, critical = expected(counts)
    with ScriptedServer(handler(counts)) as srv:
        t0 = time.perf_counter()
        res = run_swarm(srv, tmp_path, [lookup])
        wall = time.perf_counter() - t0
    m = res.metrics
    assert res.outcome == "completed" and res.output == f"total={total} completed=300/300"
    assert m.subagents == 300 and m.subagent_outcomes == {"completed": 300}
    assert m.tool_calls == 4000 and m.critical_steps == critical == 7
    assert m.model_calls == 3 + sum(1 + i % 3 + 1 for i in range(300)) == srv.stats.requests
    assert wall < 60
    spans = read_spans(tmp_path)
    assert sum(s["kind"] == "tool" for s in spans) == 4000 and sum(s["kind"] == "agent" for s in spans) == 301
    assert sum(s.get("prompt_tokens", 0) + s.get("completion_tokens", 0) for s in spans) == m.tokens
    tree = render_tree(tmp_path)
    assert "agent orchestrator" in tree and "w299" in tree and "more" in tree


def test_critical_steps_follow_the_longest_subagent_of_each_stage(tmp_path):
    counts = plan(6, 40)  # workers 0..5 take 2, 3, 4, 2, 3, 4 steps
    with ScriptedServer(handler(counts)) as srv:
        res = run_swarm(srv, tmp_path, [lookup])
    assert res.metrics.critical_steps == 1 + (1 + 4) + 1
    assert res.metrics.model_calls == 3 + 2 + 3 + 4 + 2 + 3 + 4


def test_tool_call_limit_stops_the_swarm_cleanly(tmp_path):
    counts = plan(300, 4000)
    with ScriptedServer(handler(counts)) as srv:
        res = run_swarm(srv, tmp_path, [lookup], SwarmLimits(max_tool_calls=1000))
    m = res.metrics
    assert m.tool_calls <= 1000 and res.outcome == "completed"
    done = int(res.output.split("completed=")[1].split("/")[0])
    assert 0 < done < 300 and m.subagent_outcomes["stopped"] == 300 - done
    stopped = [e["summary"] for e in read_jsonl(tmp_path / "journal.jsonl")
               if e["event"] == "subagent_done" and e["summary"]["outcome"] == "stopped"]
    assert all(s["reason"].startswith("tool call limit reached") for s in stopped)
    assert m.subagents == 300


def test_subagent_limit_is_reported_to_the_orchestrator(tmp_path):
    counts = plan(12, 100)
    with ScriptedServer(handler(counts)) as srv:
        res = run_swarm(srv, tmp_path, [lookup], SwarmLimits(max_subagents=10))
    assert res.metrics.subagents == 10 and res.outcome == "completed"
    assert res.output.endswith("completed=10/10")


def test_twenty_percent_faults_still_complete_and_retries_are_traced(tmp_path):
    counts = plan(40, 300)
    total, _ = expected(counts)
    # the client's timeout sits well above a normal reply on a loaded 2-core machine (at 0.4 s, slow replies
    # timed out too: 61 retries for 29 injected faults) and well below the injected hang
    faults = Faults(rate=0.2, hang_s=3.0, seed=3)
    with ScriptedServer(handler(counts), faults=faults) as srv:
        res = run_swarm(srv, tmp_path, [lookup], timeout=1.5, backoff=(0.02, 0.2), max_retries=12)
        injected = srv.stats.faults
    assert res.output == f"total={total} completed=40/40"
    assert all(injected[k] > 0 for k in ("429", "500", "timeout"))
    traced = sum(s.get("retries", 0) for s in read_spans(tmp_path) if s["kind"] == "model")
    assert traced == res.metrics.retries == sum(injected.values())


def test_a_subagent_that_raises_or_hangs_fails_alone(tmp_path):
    counts = plan(8, 60)
    base = handler(counts)

    @tool
    async def hang() -> str:
        await asyncio.sleep(3600)
        return "never"

    def reply(req):
        if req.system == "worker 3":
            raise RuntimeError("scripted crash")  # the server answers 400: the sub-agent's model call fails
        if req.system == "worker 5":
            return {"tool_calls": [{"name": "hang", "arguments": {}}]}
        return base(req)
    limits = SwarmLimits(subagent=AgentLimits(max_wall_s=1.0))
    with ScriptedServer(reply) as srv:
        t0 = time.perf_counter()
        res = run_swarm(srv, tmp_path, [lookup, hang], limits)
    assert time.perf_counter() - t0 < 10
    assert res.metrics.subagent_outcomes == {"completed": 6, "failed": 1, "timed_out": 1}
    assert res.output.endswith("completed=6/8")


KILL_WORKERS = 30


def file_worker_handler(seen: list):
    """Orchestrator as in swarm_script; worker i writes i*i to a file, reads it back and answers it."""
    orchestrator = handler([1] * KILL_WORKERS)

    def reply(req):
        if not req.system.startswith("worker"):
            return orchestrator(req)
        seen.append(req.system)
        i = int(req.system.split()[1])
        if req.step == 0:
            return {"tool_calls": [{"name": "write_file", "arguments": {"path": "n.txt", "content": str(i * i)}}]}
        if req.step == 1:
            return {"tool_calls": [{"name": "read_file", "arguments": {"path": "n.txt"}}]}
        return {"content": req.tool_results[0]["content"]}
    return reply


def test_kill_9_then_resume_skips_completed_subagents(tmp_path):
    seen: list[str] = []
    reply = file_worker_handler(seen)
    run_dir = tmp_path / "run"
    expect = f"total={sum(i * i for i in range(KILL_WORKERS))} completed={KILL_WORKERS}/{KILL_WORKERS}"
    with ScriptedServer(reply, latency=0.05) as srv:
        env = {**os.environ, "K2LAB_BASE_URL": srv.base_url, "K2LAB_API_KEY": "k", "K2LAB_MODEL": "m"}
        cmd = [sys.executable, "-m", "k2lab.cli", "swarm"]
        proc = subprocess.Popen(cmd + ["sum", "--run-dir", str(run_dir), "--max-concurrency", "3"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = run_dir / "journal.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count('"subagent_done"') >= 8:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = {e["summary"]["agent"] for e in read_jsonl(journal) if e["event"] == "subagent_done"}
        assert 8 <= len(done_before) < KILL_WORKERS
        seen.clear()
        out = subprocess.run(cmd + ["--resume", str(run_dir), "--max-concurrency", "3"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rerun = {s.replace("worker ", "w") for s in seen}
    assert not rerun & done_before, f"completed sub-agents ran again: {sorted(rerun & done_before)}"
    assert rerun | done_before == {f"w{i}" for i in range(KILL_WORKERS)}
    result = json.loads((run_dir / "result.json").read_text())
    assert result["output"] == expect and expect in out.stdout
    assert result["metrics"]["reused_from_journal"] == len(done_before)
    assert result["metrics"]["tool_calls"] == 2 * KILL_WORKERS + 2 * KILL_WORKERS
    tree = subprocess.run(cmd[:-1] + ["trace", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert tree.returncode == 0 and "agent orchestrator" in tree.stdout and "w29" in tree.stdout


def test_two_swarms_at_once_keep_their_own_state(tmp_path):
    """One Swarm, two overlapping runs on different tasks: each run's journal, metrics and answer are its own."""
    plans = {"task a": plan(5, 40), "task b": plan(9, 60)}
    scripts = {task: handler(counts) for task, counts in plans.items()}

    def reply(req):  # orchestrators are told apart by their task; workers only need their own prompt
        return scripts[req.user](req) if req.system == ORCHESTRATOR_PROMPT else scripts["task a"](req)

    async def go(srv):
        async with LLM(base_url=srv.base_url, api_key="k", model="m") as llm:
            swarm = Swarm(llm, lambda run_dir, name: [lookup], SwarmLimits(max_tool_calls=80))
            return await asyncio.gather(*(swarm.run(task, tmp_path / task.split()[1]) for task in plans))

    with ScriptedServer(reply, latency=0.02) as srv:
        results = asyncio.run(go(srv))
    for (task, counts), res in zip(plans.items(), results):
        total, critical = expected(counts)
        assert res.output == f"total={total} completed={len(counts)}/{len(counts)}"
        assert res.metrics.subagents == len(counts) and res.metrics.critical_steps == critical
        assert res.metrics.tool_calls == sum(counts) + 2 * len(counts)  # each run has its own budget of 80
        events = read_jsonl(res.run_dir / "journal.jsonl")
        assert events[0] == {**events[0], "event": "start", "task": task}
        assert sum(e["event"] == "subagent_done" for e in events) == len(counts)
        assert sum(s["kind"] == "agent" for s in read_spans(res.run_dir)) == len(counts) + 1


def test_sampling_reaches_every_model_call(tmp_path):
    """Swarm(sampling=...) sets the fields of the orchestrator's calls and of every sub-agent's."""
    counts, bodies = plan(4, 40), []
    script = handler(counts)

    def reply(req):
        bodies.append(req.body)
        return script(req)

    async def go(srv):
        async with LLM(base_url=srv.base_url, api_key="k", model="m") as llm:
            swarm = Swarm(llm, lambda run_dir, name: [lookup], sampling={"temperature": 0.0, "max_tokens": 7})
            return await swarm.run("sum all entries", tmp_path)

    with ScriptedServer(reply) as srv:
        res = asyncio.run(go(srv))
    assert res.outcome == "completed" and len(bodies) == res.metrics.model_calls > 4
    assert {(b.get("temperature"), b.get("max_tokens")) for b in bodies} == {(0.0, 7)}
    assert read_jsonl(tmp_path / "journal.jsonl")[0]["sampling"] == {"temperature": 0.0, "max_tokens": 7}


def test_a_resumed_swarm_keeps_the_sampling_it_started_with(tmp_path):
    """The start event journals the sampling; a resume without sampling uses it, other values are refused (one run
    would mix two samplings), and a journal from before sampling was recorded takes what is given."""
    import pytest

    from k2lab.runs import RunDirError, append_jsonl, claim

    task, bodies = "sum all entries", []
    script = handler(plan(3, 20))

    def reply(req):
        bodies.append(req.body)
        return script(req)

    def unfinished(run_dir, start: dict):  # a run killed right after it started
        claim(run_dir, {"task": task}, "swarm")
        append_jsonl(run_dir / "journal.jsonl", {"event": "start", "task": task, **start})

    async def resume(srv, run_dir, sampling):
        async with LLM(base_url=srv.base_url, api_key="k", model="m") as llm:
            return await Swarm(llm, lambda run_dir, name: [lookup], sampling=sampling).run(None, run_dir, resume=True)

    with ScriptedServer(reply) as srv:
        unfinished(tmp_path / "a", {"sampling": {"temperature": 0.0, "max_tokens": 7}})
        with pytest.raises(RunDirError, match=r"started with --max-tokens 7 --temperature 0.0, not --max-tokens 9"):
            asyncio.run(resume(srv, tmp_path / "a", {"max_tokens": 9}))
        assert not bodies
        res = asyncio.run(resume(srv, tmp_path / "a", {}))
        assert res.outcome == "completed"
        assert {(b.get("temperature"), b.get("max_tokens")) for b in bodies} == {(0.0, 7)}
        bodies.clear()
        unfinished(tmp_path / "b", {})  # journaled before sampling was recorded
        assert asyncio.run(resume(srv, tmp_path / "b", {"max_tokens": 9})).outcome == "completed"
        assert {b.get("max_tokens") for b in bodies} == {9}
    assert read_jsonl(tmp_path / "a" / "journal.jsonl")[0]["sampling"] == {"temperature": 0.0, "max_tokens": 7}


def test_cli_max_tokens_and_temperature_reach_the_requests(tmp_path):
    """`k2lab agent` and `k2lab swarm` send --max-tokens / --temperature on each call, and nothing when not given
    (the endpoint's defaults)."""
    bodies = []

    def reply(req):
        bodies.append(req.body)
        return {"content": "done"}

    runs = [(cmd, extra, flags) for cmd, extra in [("agent", ["--workspace", str(tmp_path / "ws")]), ("swarm", [])]
            for flags in (["--max-tokens", "9", "--temperature", "0"], [])]
    with ScriptedServer(reply) as srv:
        env = {**os.environ, "K2LAB_BASE_URL": srv.base_url, "K2LAB_API_KEY": "k", "K2LAB_MODEL": "m"}
        # the four runs at once (each is mostly the interpreter's start); run i's task names it, so each request
        # body is told apart by its messages
        *results, bad = side_by_side([[sys.executable, "-m", "k2lab.cli", cmd, f"say done (run {i})", *extra, *flags,
                                       "--run-dir", str(tmp_path / f"{cmd}{len(flags)}")]
                                      for i, (cmd, extra, flags) in enumerate(runs)]
                                     + [[sys.executable, "-m", "k2lab.cli", "agent", "x", "--max-tokens", "0"]],
                                     timeout=120, env=env)
    assert bad.returncode == 2 and "--max-tokens" in bad.stderr and "Traceback" not in bad.stderr
    for i, ((cmd, _, flags), r) in enumerate(zip(runs, results)):
        assert r.returncode == 0 and "outcome: completed" in r.stdout, r.stderr[-2000:]
        mine = [b for b in bodies if f"(run {i})" in json.dumps(b["messages"])]
        got = {(b.get("max_tokens"), b.get("temperature")) for b in mine}
        assert mine and got == ({(9, 0.0)} if flags else {(None, None)}), (cmd, flags, got)
