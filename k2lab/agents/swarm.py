"""Agent Swarm: an orchestrator agent that creates sub-agents on the fly and runs them in parallel.

The orchestrator is an ordinary agent loop with two tools, `create_subagent(name, system_prompt)` and
`assign_task(agent, prompt)`. All `assign_task` calls of one orchestrator message run concurrently (the agent
loop gathers a message's tool calls); each runs a fresh sub-agent loop with its own context, tools and limits and
returns only its final output and outcome (completed, stopped, failed, timed_out) as the tool result, in call
order. Limits: sub-agents (default 300), total tool calls across the swarm (default 4,000, orchestrator
included), sub-agents running at once, per-sub-agent steps and wall time. Rate limiting is absorbed by the LLM
client: retries with backoff, and a concurrency limit that halves on 429 and ramps back up one call per success.

Critical steps (K2.5 report): sum over orchestrator steps t of (1 + the most steps of a sub-agent started at t).

State: a `Swarm` holds what runs share (client, tool factory, limits, prompt); each `run()` keeps its own state
(directory, journal, trace, tool budget, sub-agents, their results) in a `SwarmRun`, so one process can run
several swarms at once. The orchestrator's step reaches `assign_task` as an argument (`tool(with_step=True)`);
sub-agent results stay `AgentSummary` dataclasses until the journal and `result.json` are written.

Resume: the journal records the task, the sampling fields, every orchestrator message and every finished
sub-agent. A resumed run continues with the journaled sampling (other values are refused) and
replays the orchestrator's journaled messages instead of asking the model again and answers `assign_task`
calls whose sub-agent already finished from the journal, so completed sub-agents are not run again. Hand-written
because no library offers this orchestration with resume; the pieces it uses (openai, tenacity) are libraries.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from k2lab.agents.agent import Agent, AgentLimits, AgentResult, AgentSummary, ToolBudget
from k2lab.agents.llm import LLM, EndpointError, Usage
from k2lab.agents.sandbox import Sandbox
from k2lab.agents.tools import Tool, tool, workspace_tools
from k2lab.agents.trace import Tracer
from k2lab.runs import RunDirError, append_jsonl, claim, read_jsonl, write_json

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
class SwarmMetrics:
    subagents: int  # created
    subagent_runs: int  # assign_task calls answered (run now or taken from the journal)
    subagent_outcomes: dict[str, int]
    reused_from_journal: int
    tool_calls: int
    model_calls: int
    orchestrator_steps: int
    critical_steps: int  # sum over orchestrator steps of (1 + the longest sub-agent started in it)
    tokens: int
    prompt_tokens: int
    completion_tokens: int
    retries: int
    cost_usd: float
    wall_s: float


@dataclass
class SwarmResult:
    output: str
    outcome: str
    reason: str
    run_dir: Path
    metrics: SwarmMetrics

    def as_dict(self) -> dict:
        return {"output": self.output, "outcome": self.outcome, "reason": self.reason,
                "metrics": asdict(self.metrics)}


ToolFactory = Callable[[Path, str], list[Tool]]  # (run dir, sub-agent name) -> its tools


def workspace_tool_factory(run_dir: Path, name: str) -> list[Tool]:
    """Each sub-agent gets the workspace tools in its own folder, run_dir/workspace/NAME."""
    return workspace_tools(Sandbox(run_dir / "workspace" / name))


class Swarm:
    """What every run shares: the client, the sub-agents' tool factory, limits, the orchestrator's prompt.
    `await swarm.run(task, run_dir)`; runs may overlap (each has its own `SwarmRun`)."""

    def __init__(self, llm: LLM, tools: ToolFactory = workspace_tool_factory, limits: SwarmLimits = SwarmLimits(),
                 system_prompt: str = ORCHESTRATOR_PROMPT, on_event: Callable[[dict], None] | None = None,
                 sampling: dict | None = None):
        """sampling: request fields of every model call, the orchestrator's and the sub-agents' (e.g.
        {"temperature": 0.0, "max_tokens": 256}); none: the endpoint's defaults."""
        self.llm, self.tools, self.limits, self.system_prompt = llm, tools, limits, system_prompt
        self.sampling = dict(sampling or {})
        self.on_event = on_event or (lambda e: None)

    async def run(self, task: str | None, run_dir: str | Path, resume: bool = False) -> SwarmResult:
        """Run `task` in run_dir, or with resume=True continue the run journaled there."""
        run_dir = Path(run_dir)
        journal = run_dir / "journal.jsonl"
        events = read_jsonl(journal)
        if resume:
            if not events or events[0].get("event") != "start":
                raise RunDirError(f"nothing to resume in {run_dir}: no journal.jsonl with a start event; "
                                  "start a run there without --resume")
            if events[-1].get("event") == "finish":
                raise RunDirError(f"{run_dir} holds a finished swarm run (outcome {events[-1]['outcome']}); "
                                  f"its answer is in {run_dir / 'result.json'}; use another --run-dir for a new run")
            task = events[0]["task"]
            sampling = resumed_sampling(events[0], self.sampling, run_dir)
        elif events:
            raise RunDirError(f"{run_dir} already holds a swarm run; pass --resume to continue it or use another "
                              "--run-dir")
        else:
            sampling = self.sampling
        if not task or not task.strip():
            raise ValueError("the swarm's task is empty")
        claim(run_dir, {"task": task}, "swarm")
        if not resume:
            append_jsonl(journal, {"event": "start", "task": task, "sampling": sampling, "time": time.time()})
        return await SwarmRun(self, run_dir, events, sampling).run(task, resume)


def resumed_sampling(start: dict, given: dict, run_dir: Path) -> dict:
    """The sampling a resumed run continues with: the journaled one (the run's model calls replayed from the
    journal were made with it), unless none was given now; other values are refused, since one run would then mix
    two samplings. A journal from before sampling was recorded continues with what is given."""
    if "sampling" not in start:
        return given
    journaled = start["sampling"]
    if given and given != journaled:
        def flags(d: dict) -> str:
            return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(d.items())) or "no sampling flags"
        raise RunDirError(f"{run_dir} was started with {flags(journaled)}, not {flags(given)}; resume it without "
                          f"sampling flags (the journaled ones are used) or start a new run with --run-dir")
    return journaled


class SwarmRun:
    """The state of one run: its journal, trace, shared tool budget, sub-agents and their results."""

    def __init__(self, swarm: Swarm, run_dir: Path, events: list[dict], sampling: dict):
        self.swarm, self.limits, self.run_dir, self.sampling = swarm, swarm.limits, run_dir, sampling
        self.journal = run_dir / "journal.jsonl"
        self.done = {e["key"]: AgentSummary.from_dict(e["summary"]) for e in events if e["event"] == "subagent_done"}
        replay = {e["step"]: e["message"] for e in events if e["event"] == "orchestrator_message"}
        self.replay = [replay[i] for i in range(len(replay)) if i in replay]
        self.budget = ToolBudget(self.limits.max_tool_calls)
        self.subagents: dict[str, str] = {}  # name -> system prompt
        self.assigned: dict[str, int] = {}  # occurrences of each (agent, prompt), for journal keys
        self.results: list[AgentSummary] = []
        self.sub_steps: dict[int, int] = {}  # orchestrator step -> most steps of a sub-agent started in it
        self.reused = 0
        self.running = asyncio.Semaphore(self.limits.max_concurrency)
        self.tracer = Tracer(run_dir / "trace.jsonl")
        # journal records are fsync'd (~3 ms each here): one writer thread keeps them in order and off the event
        # loop, where 300 sub-agents finishing together would otherwise wait ~1 s on the disk
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="swarm-journal")
        self.written: list[Future] = []

    def record(self, event: dict) -> None:
        self.written.append(self.writer.submit(append_jsonl, self.journal, event))

    async def run(self, task: str, resume: bool) -> SwarmResult:
        orchestrator = Agent("orchestrator", self.swarm.llm, self.swarm.system_prompt, self._orchestrator_tools(),
                             self.limits.orchestrator, self.tracer, self.budget, sampling=self.sampling,
                             replay=self.replay,
                             on_message=lambda step, m: self.record(
                                 {"event": "orchestrator_message", "step": step, "message": m}))
        t0 = time.perf_counter()
        try:
            with self.tracer.span("run", "swarm", task=task[:200], resumed=resume):
                res = await orchestrator.run(task)
        finally:
            self.tracer.close()
            self.writer.shutdown(wait=True)
        for f in self.written:
            f.result()  # a failed journal write (disk full...) is an error of the run
        result = SwarmResult(res.output, res.outcome, res.reason, self.run_dir,
                             self._metrics(res, time.perf_counter() - t0))
        write_json(self.run_dir / "result.json", result.as_dict())
        append_jsonl(self.journal, {"event": "finish", "outcome": res.outcome, "output": res.output})
        return result

    def _metrics(self, orch: AgentResult, wall_s: float) -> SwarmMetrics:
        usage = Usage()
        for u in [orch.usage] + [s.usage for s in self.results]:
            usage.add(u.prompt_tokens, u.completion_tokens, u.retries, u.cost_usd)
        outcomes: dict[str, int] = {}
        for s in self.results:
            outcomes[s.outcome] = outcomes.get(s.outcome, 0) + 1
        return SwarmMetrics(
            subagents=len(self.subagents), subagent_runs=len(self.results), subagent_outcomes=outcomes,
            reused_from_journal=self.reused, tool_calls=orch.tool_calls + sum(s.tool_calls for s in self.results),
            model_calls=orch.steps + sum(s.steps for s in self.results), orchestrator_steps=orch.steps,
            critical_steps=orch.steps + sum(self.sub_steps.values()), tokens=usage.total_tokens,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, retries=usage.retries,
            cost_usd=round(usage.cost_usd, 6), wall_s=round(wall_s, 4))

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

        @tool(with_step=True)
        async def assign_task(agent: str, prompt: str, step: int) -> str:
            """Give a sub-agent a task; returns its final output and outcome."""
            if agent not in self.subagents:
                return f"error: no sub-agent named {agent!r}; create it first with create_subagent"
            s = await self._run_subagent(agent, prompt, step)
            return json.dumps({k: v for k, v in (("agent", s.agent), ("outcome", s.outcome), ("output", s.output),
                                                 ("reason", s.reason)) if v})

        return [create_subagent, assign_task]

    async def _run_subagent(self, name: str, prompt: str, orch_step: int) -> AgentSummary:
        ident = json.dumps([name, self.subagents[name], prompt])
        n = self.assigned[ident] = self.assigned.get(ident, 0) + 1
        key = hashlib.sha256(f"{ident}#{n}".encode()).hexdigest()[:24]
        if key in self.done:
            summary = self.done[key]
            self.reused += 1
            self.budget.take(min(summary.tool_calls, self.budget.left))
        else:
            async with self.running:
                try:
                    agent = Agent(name, self.swarm.llm, self.subagents[name], self.swarm.tools(self.run_dir, name),
                                  self.limits.subagent, self.tracer, self.budget, sampling=self.sampling)
                    summary = (await agent.run(prompt)).summary()
                except EndpointError:  # nothing answers at the endpoint: the whole run stops (and can resume)
                    raise
                except Exception as e:  # e.g. its tools could not be built: it fails alone
                    summary = AgentSummary(name, "failed", "", reason=f"{type(e).__name__}: {e}")
            self.record({"event": "subagent_done", "key": key, "summary": summary.as_dict()})
        self.results.append(summary)
        self.sub_steps[orch_step] = max(self.sub_steps.get(orch_step, 0), summary.steps)
        self.swarm.on_event({"event": "subagent_done", **summary.as_dict(), "done": len(self.results),
                             "run_dir": str(self.run_dir)})
        return summary


def run_swarm(task: str | None, llm: LLM, run_dir: Path | None = None, resume: bool = False,
              limits: SwarmLimits = SwarmLimits(), mcp: list[str] = (), sampling: dict | None = None) -> SwarmResult:
    """`k2lab swarm`: a swarm against `llm`'s endpoint; sub-agents get workspace (+ MCP) tools."""
    from tqdm import tqdm

    from k2lab.agents.mcp import MCPTools

    if resume and run_dir is None:
        raise RunDirError("--resume needs the run directory")
    run_dir = Path(run_dir or f"runs/swarm-{time.strftime('%Y%m%d-%H%M%S')}")
    bar = tqdm(desc="sub-agents done", unit="agent")

    def progress(e: dict) -> None:
        bar.update(1)
        bar.set_postfix_str(f"last: {e['agent']} {e['outcome']}")

    async def go() -> SwarmResult:
        async with llm, MCPTools(list(mcp)) as mcp_tools:
            def tools(run_dir: Path, name: str) -> list[Tool]:
                return workspace_tool_factory(run_dir, name) + mcp_tools
            return await Swarm(llm, tools, limits, on_event=progress, sampling=sampling).run(task, run_dir,
                                                                                             resume=resume)
    try:
        return asyncio.run(go())
    finally:
        bar.close()
