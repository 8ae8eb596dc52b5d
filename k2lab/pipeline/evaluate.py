"""What the recipe measures on a checkpoint, always through the OpenAI-compatible server serving it.

`evaluate` serves the checkpoint and runs the tool-call eval, the calibration eval (deterministic rules grader,
offline), the coding eval and the embedded agent tasks against it; with `swarm=True` also a small swarm run.
Each eval writes its own run directory under OUT and resumes it on a rerun.

Agent tasks: an `Agent` (what `k2lab agent` runs) gets a single-turn embedded task with that domain's real tools
executed against the task's state; afterwards the task's `Environment` replays the agent's assistant messages
(the same tools, no injected faults) and grades the rubric, so success means every rubric checkpoint passed.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
from tqdm.asyncio import tqdm_asyncio

from k2lab.agents.agent import Agent, AgentLimits
from k2lab.agents.llm import LLM
from k2lab.agents.swarm import Swarm, SwarmLimits
from k2lab.agents.tools import ArgumentError, Tool
from k2lab.evals.calibration import CalibrationSettings, run_calibration
from k2lab.evals.coding import CodingSettings, run_coding
from k2lab.evals.rules import RulesJudge
from k2lab.evals.toolcall import ToolcallSettings, run_toolcalls
from k2lab.pipeline import builders
from k2lab.pipeline.presets import Recipe
from k2lab.runs import write_json
from k2lab.serve.server import build_server, serve_in_thread
from k2lab.synth.domains import registry
from k2lab.synth.env import Environment, ToolError


def domain_tools(domain, state) -> list[Tool]:
    """The domain's tools as agent tools, run by the domain's code against `state`."""
    out = []
    for spec in domain.tools:
        fn = spec["function"]
        validator = jsonschema.Draft202012Validator(fn["parameters"])

        def validate(args: dict, v=validator) -> dict:
            errors = [e.message for e in v.iter_errors(args)]
            if errors:
                raise ArgumentError("; ".join(errors))
            return args

        def run(_name=fn["name"], **args):
            try:
                result = domain.run_tool(state, _name, args)
            except ToolError as e:
                return f"error: {e}"
            return result if isinstance(result, str) else json.dumps(result, sort_keys=True)
        out.append(Tool(fn["name"], fn.get("description", ""), fn["parameters"], run, validate))
    return out


async def agent_task(llm: LLM, task, max_steps: int, max_tokens: int) -> dict:
    domain = registry()[task.domain]
    state = domain.initial_state(task)
    try:
        # greedy, as the other evals: sampled at the server's default temperature the same checkpoint solved a
        # different task on each run
        agent = Agent("agent", llm, task.system, domain_tools(domain, state), AgentLimits(max_steps=max_steps),
                      sampling={"temperature": 0.0, "max_tokens": max_tokens})
        res = await agent.run(task.turns[0])
    finally:
        domain.close(state)
    env = Environment(domain, task)
    env.reset()
    try:
        for m in res.messages[2:]:
            if m.get("role") == "assistant" and not env.done:
                env.step(m)
        verdicts = env.verdicts()
    finally:
        env.close()
    return {"task_id": task.task_id, "domain": task.domain, "request": task.turns[0], "outcome": res.outcome,
            "reason": res.reason, "steps": res.steps, "tool_calls": res.tool_calls,
            "answer": (res.output or "")[:300],
            "success": all(v["passed"] for v in verdicts), "verdicts": verdicts}


async def swarm_run(llm: LLM, tasks: list, run_dir: Path, max_steps: int, max_tokens: int) -> dict:
    """The orchestrator gets several embedded requests at once; each sub-agent gets the tools of all their
    domains (one shared state per domain for the run). Greedy with a per-call cap, as the agent tasks."""
    reg = registry()
    states = {t.domain: reg[t.domain].initial_state(t) for t in tasks}
    try:
        def tools(_run_dir: Path, _name: str) -> list[Tool]:
            return [tool for d, s in states.items() for tool in domain_tools(reg[d], s)]
        limits = SwarmLimits(max_subagents=8, max_tool_calls=64, max_concurrency=4,
                             subagent=AgentLimits(max_steps=max_steps, max_wall_s=300.0),
                             orchestrator=AgentLimits(max_steps=max_steps + 2, max_wall_s=600.0))
        task = "Handle these independent requests, one sub-agent each:\n" + "\n".join(
            f"{i + 1}. {t.turns[0]}" for i, t in enumerate(tasks))
        resume = (run_dir / "journal.jsonl").exists() and not (run_dir / "result.json").exists()
        if (run_dir / "result.json").exists():
            return json.loads((run_dir / "result.json").read_text())
        result = await Swarm(llm, tools, limits, sampling={"temperature": 0.0, "max_tokens": max_tokens}).run(
            task, run_dir, resume=resume)
        return result.as_dict()
    finally:
        for d, s in states.items():
            reg[d].close(s)


def evaluate(checkpoint: Path, out: Path, r: Recipe, run_dir: Path, swarm: bool = False) -> dict:
    """Serve `checkpoint` and run every eval against it; their results, summarized for the report."""
    name = f"k2lab-{out.name}"
    # the recipe trains with thinking off (SFT and RL render `<think></think>`), so it is served that way
    server = build_server(checkpoint, max_len=r.serve_max_len, cache_mb=64, max_slots=16, model_name=name,
                          default_template_kwargs={"thinking": False})
    toolcall_set, calibration_set = builders.toolcall_eval_set(run_dir, r), builders.calibration_eval_set(run_dir, r)
    coding_set, tasks = builders.coding_eval_set(run_dir, r), builders.agent_tasks(r, r.agent_tasks)
    with serve_in_thread(server) as base_url:
        async def go() -> dict:
            llm = LLM(base_url=base_url, api_key="none", model=name, max_concurrency=8)
            try:
                tc_dir, cal_dir, code_dir = out / "toolcalls", out / "calibration", out / "coding"
                tc = await run_toolcalls(llm, ToolcallSettings(
                    dataset=str(toolcall_set), run_dir=str(tc_dir), resume=True, on_error="skip",
                    max_tokens=r.eval_max_tokens))
                cal = await run_calibration(llm, [RulesJudge()], CalibrationSettings(
                    dataset=str(calibration_set), run_dir=str(cal_dir), resume=True, grader="rules",
                    max_tokens=r.calibration_max_tokens))
                code = await run_coding(llm, CodingSettings(
                    dataset=coding_set, run_dir=str(code_dir), resume=True,
                    max_tokens=r.eval_max_tokens))
                agents = await tqdm_asyncio.gather(
                    *(agent_task(llm, t, r.agent_max_steps, r.agent_max_tokens) for t in tasks),
                    desc="agent tasks", unit="task")
                write_json(out / "agent_tasks.json", agents)
                sw = await swarm_run(llm, tasks[:r.swarm_tasks], out / "swarm", r.agent_max_steps,
                                     r.agent_max_tokens) if swarm else None
                return summarize(tc, cal, code, agents, sw)
            finally:
                await llm.aclose()
        return asyncio.run(go())


def summarize(tc: dict, cal: dict, code: dict, agents: list[dict], swarm: dict | None) -> dict:
    fr = tc.get("finish_reason") or {}
    overall = cal["overall"]
    out = {
        "toolcalls": {"requests": tc["requests"], "answered": tc["answered"],
                      "tool_call_responses": tc["tool_call_responses"], "trigger_f1": fr.get("f1"),
                      "precision": fr.get("precision"), "recall": fr.get("recall"),
                      "schema_accuracy": tc["schema_accuracy"]},
        "calibration": {k: overall.get(k) for k in ("total", "accuracy", "accuracy_ci95", "hallucination_rate",
                                                    "hallucination_rate_ci95", "omniscience_index")}
        | {"by_kind": {k: {"total": m["total"], "accuracy": m["accuracy"],
                           "abstention_rate": (m.get("not_attempted", 0) / m["total"]) if m["total"] else None,
                           "hallucination_rate": m["hallucination_rate"]} for k, m in cal["kinds"].items()},
           "abstention_rate": (overall.get("not_attempted", 0) / overall["total"]) if overall["total"] else None},
        "coding": {"problems": code["problems"], "pass_at_1": code["pass_at_k"].get("1")},
        "agent": {"tasks": len(agents), "succeeded": sum(a["success"] for a in agents),
                  "success_rate": sum(a["success"] for a in agents) / len(agents) if agents else None,
                  "solved": [a["task_id"] for a in agents if a["success"]]},
    }
    if swarm is not None:
        m = swarm["metrics"]
        out["swarm"] = {"outcome": swarm["outcome"], "subagents": m["subagents"], "subagent_runs": m["subagent_runs"],
                        "critical_steps": m["critical_steps"], "model_calls": m["model_calls"],
                        "tool_calls": m["tool_calls"], "output": (swarm["output"] or "")[:300]}
    return out
