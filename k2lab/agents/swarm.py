"""Agent Swarm: an orchestrator agent that creates sub-agents on the fly and runs them in parallel.

The orchestrator is an ordinary agent loop with two tools, `create_subagent(name, system_prompt)` and
`assign_task(agent, prompt)`. All `assign_task` calls of one orchestrator message run concurrently (the agent
loop gathers a message's tool calls); each runs a fresh sub-agent loop with its own context, tools and limits and
returns only its final output and outcome (completed, stopped, failed, timed_out) as the tool result, in call
order. Limits: sub-agents (default 300), total tool calls across the swarm (default 4,000, orchestrator
included), sub-agents running at once, per-sub-agent steps and wall time. Rate limiting is absorbed by the LLM
client: retries with backoff, and a concurrency limit that halves on 429 and ramps back up one call per success.

Critical steps (K2.5 report): sum over orchestrator steps t of (1 + the most steps of a sub-agent started at t).

Resume: the journal records the task, every orchestrator message and every finished sub-agent. A resumed run
replays the orchestrator's journaled messages instead of asking the model again and answers `assign_task`
calls whose sub-agent already finished from the journal, so completed sub-agents are not run again. Hand-written
because no library offers this orchestration with resume; the pieces it uses (openai, tenacity) are libraries.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from k2lab.agents.agent import Agent, AgentLimits, AgentResult, ToolBudget
from k2lab.agents.llm import LLM, Usage
from k2lab.agents.sandbox import Sandbox
from k2lab.agents.tools import Tool, tool, workspace_tools
from k2lab.agents.trace import Journal, Tracer
from k2lab.runs import write_json

ORCHESTRATOR_PROMPT = (
    "You are the orchestrator of an agent swarm. Break the task into independent parts. Create specialised "
    "sub-agents with create_subagent(name, system_prompt), then give them work with assign_task(agent, prompt); "
    "several assign_task calls in one message run in parallel. Each returns the sub-agent's final output and "
    "outcome. Combine the results into the final answer.")


@dataclass(frozen=True)
class SwarmLimits:
    max_subagents: int = 300
    max_tool_calls: int = 4000
    max_concurrency: int = 300  # sub-agents running at once
    subagent: AgentLimits = AgentLimits(max_steps=30, max_wall_s=300.0)
    orchestrator: AgentLimits = AgentLimits(max_steps=50, max_tool_calls=10**9, max_wall_s=3600.0)

    def __post_init__(self) -> None:
        if min(self.max_subagents, self.max_tool_calls, self.max_concurrency) < 1:
            raise ValueError(f"SwarmLimits must be positive: {self}")


@dataclass
class SwarmResult:
    output: str
    outcome: str
    reason: str
    run_dir: Path
    metrics: dict = field(default_factory=dict)


class Swarm:
    def __init__(self, llm: LLM, run_dir: Path, tools: Callable[[str], list[Tool]] | None = None,
                 limits: SwarmLimits = SwarmLimits(), system_prompt: str = ORCHESTRATOR_PROMPT,
                 on_event: Callable[[dict], None] | None = None):
        self.llm, self.limits, self.system_prompt = llm, limits, system_prompt
        self.run_dir = Path(run_dir)
        self.tools = tools or (lambda name: workspace_tools(Sandbox(self.run_dir / "workspace" / name)))
        self.on_event = on_event or (lambda e: None)

    async def run(self, task: str | None = None, resume: bool = False) -> SwarmResult:
        """Run `task`, or with resume=True continue the run journaled in run_dir."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        journal_path = self.run_dir / "journal.jsonl"
        events = Journal.load(journal_path) if resume and journal_path.exists() else []
        if resume:
            if not events or events[0].get("event") != "start":
                raise FileNotFoundError(f"nothing to resume in {self.run_dir}: no journal.jsonl with a start event")
            task = events[0]["task"]
        elif journal_path.exists():
            raise FileExistsError(f"{self.run_dir} already holds a run; pass resume=True or use a new run dir")
        if not task:
            raise ValueError("Swarm.run: empty task")
        replay = {e["step"]: e["message"] for e in events if e["event"] == "orchestrator_message"}
        replay = [replay[i] for i in range(len(replay)) if i in replay]
        self.done = {e["key"]: e["summary"] for e in events if e["event"] == "subagent_done"}
        self.journal, self.tracer = Journal(journal_path), Tracer(self.run_dir / "trace.jsonl")
        if not resume:
            self.journal.append({"event": "start", "task": task, "time": time.time()})
        self.budget = ToolBudget(self.limits.max_tool_calls)
        self.subagents: dict[str, str] = {}  # name -> system prompt
        self.assigned: dict[str, int] = {}  # occurrences of each (agent, prompt), for journal keys
        self.summaries: list[dict] = []
        self.sub_steps: dict[int, int] = {}  # orchestrator step -> most steps of a sub-agent started in it
        self.reused = 0
        self.running = asyncio.Semaphore(self.limits.max_concurrency)
        self.orchestrator = Agent("orchestrator", self.llm, self.system_prompt, self._orchestrator_tools(),
                                  self.limits.orchestrator, self.tracer, self.budget, replay=replay,
                                  on_message=lambda step, m: self.journal.append(
                                      {"event": "orchestrator_message", "step": step, "message": m}))
        t0 = time.perf_counter()
        try:
            with self.tracer.span("run", "swarm", task=task[:200], resumed=resume):
                res = await self.orchestrator.run(task)
        finally:
            self.tracer.close()
        metrics = self._metrics(res, time.perf_counter() - t0)
        result = SwarmResult(res.output, res.outcome, res.reason, self.run_dir, metrics)
        self.journal.append({"event": "finish", "outcome": res.outcome, "output": res.output})
        self.journal.close()
        write_json(self.run_dir / "result.json", {"output": res.output, "outcome": res.outcome,
                                                  "reason": res.reason, "metrics": metrics}, default=str)
        return result

    def _metrics(self, orch: AgentResult, wall_s: float) -> dict:
        usage = Usage()
        usage.add(orch.usage.prompt_tokens, orch.usage.completion_tokens, orch.usage.retries, orch.usage.cost_usd)
        for s in self.summaries:
            u = s["usage"]
            usage.add(u["prompt_tokens"], u["completion_tokens"], u["retries"], u["cost_usd"])
        outcomes: dict[str, int] = {}
        for s in self.summaries:
            outcomes[s["outcome"]] = outcomes.get(s["outcome"], 0) + 1
        return {"subagents": len(self.subagents), "subagent_runs": len(self.summaries),
                "subagent_outcomes": outcomes, "reused_from_journal": self.reused,
                "tool_calls": orch.tool_calls + sum(s["tool_calls"] for s in self.summaries),
                "model_calls": orch.steps + sum(s["steps"] for s in self.summaries),
                "orchestrator_steps": orch.steps,
                "critical_steps": orch.steps + sum(self.sub_steps.values()),
                "tokens": usage.total_tokens, "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens, "retries": usage.retries,
                "cost_usd": round(usage.cost_usd, 6), "wall_s": round(wall_s, 4)}

    def _orchestrator_tools(self) -> list[Tool]:
        @tool
        def create_subagent(name: str, system_prompt: str) -> str:
            """Create a sub-agent with its own system prompt (its role and how to answer)."""
            if self.subagents.get(name, system_prompt) != system_prompt:
                return f"error: a sub-agent named {name!r} already exists with another system prompt"
            if name not in self.subagents and len(self.subagents) >= self.limits.max_subagents:
                return f"error: limit of {self.limits.max_subagents} sub-agents reached; reuse existing ones"
            self.subagents[name] = system_prompt
            return f"created sub-agent {name}"

        @tool
        async def assign_task(agent: str, prompt: str) -> str:
            """Give a sub-agent a task; returns its final output and outcome."""
            if agent not in self.subagents:
                return f"error: no sub-agent named {agent!r}; create it first with create_subagent"
            summary = await self._run_subagent(agent, prompt, self.orchestrator.step)
            return json.dumps({k: summary[k] for k in ("agent", "outcome", "output", "reason") if summary[k]})

        return [create_subagent, assign_task]

    async def _run_subagent(self, name: str, prompt: str, orch_step: int) -> dict:
        ident = json.dumps([name, self.subagents[name], prompt])
        n = self.assigned[ident] = self.assigned.get(ident, 0) + 1
        key = hashlib.sha256(f"{ident}#{n}".encode()).hexdigest()[:24]
        if key in self.done:
            summary = self.done[key]
            self.reused += 1
            self.budget.take(min(summary["tool_calls"], self.budget.left))
        else:
            async with self.running:
                try:
                    agent = Agent(name, self.llm, self.subagents[name], self.tools(name), self.limits.subagent,
                                  self.tracer, self.budget)
                    summary = (await agent.run(prompt)).summary()
                except Exception as e:  # e.g. its tools could not be built: it fails alone
                    summary = AgentResult(name, "failed", "", reason=f"{type(e).__name__}: {e}").summary()
            self.journal.append({"event": "subagent_done", "key": key, "summary": summary})
        self.summaries.append(summary)
        self.sub_steps[orch_step] = max(self.sub_steps.get(orch_step, 0), summary["steps"])
        self.on_event({"event": "subagent_done", **summary, "done": len(self.summaries)})
        return summary


def run_swarm(task: str | None, run_dir: Path | None = None, resume: bool = False, max_subagents: int = 300,
              max_tool_calls: int = 4000, max_concurrency: int = 300, mcp: list[str] = ()) -> SwarmResult:
    """`k2lab swarm`: a swarm against the configured endpoint; sub-agents get workspace (+ MCP) tools."""
    from tqdm import tqdm

    from k2lab.agents.mcp import MCPTools

    if resume and run_dir is None:
        raise ValueError("--resume needs the run directory")
    run_dir = Path(run_dir or f"runs/swarm-{time.strftime('%Y%m%d-%H%M%S')}")
    limits = SwarmLimits(max_subagents, max_tool_calls, max_concurrency)
    bar = tqdm(desc="sub-agents done", unit="agent")

    def progress(e: dict) -> None:
        bar.update(1)
        bar.set_postfix_str(f"last: {e['agent']} {e['outcome']}")

    async def go() -> SwarmResult:
        llm = LLM()
        async with MCPTools(list(mcp)) as mcp_tools:
            def tools(name: str) -> list[Tool]:
                return workspace_tools(Sandbox(run_dir / "workspace" / name)) + mcp_tools
            res = await Swarm(llm, run_dir, tools, limits, on_event=progress).run(task, resume=resume)
        await llm.aclose()
        return res
    try:
        return asyncio.run(go())
    finally:
        bar.close()
