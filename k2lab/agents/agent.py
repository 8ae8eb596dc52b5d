"""The agent loop: call the model, run all tool calls of one message concurrently, feed the results back, stop on
a final answer or at a limit.

Limits (steps, tool calls, tokens, wall time) stop the run cleanly: the result carries the outcome, the reason and
the partial output (the last assistant text). A guard against repeated identical tool calls appends an
escalating reminder to the result, then stops. The context is kept under a token budget (estimated as
characters / 4): the oldest tool results are truncated first, and the truncation is stated in their text.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from k2lab.agents.llm import LLM, EndpointError, Usage
from k2lab.agents.tools import Tool
from k2lab.agents.trace import Tracer
from k2lab.runs import write_json

OUTCOMES = ("completed", "stopped", "failed", "timed_out")


@dataclass(frozen=True)
class AgentLimits:
    max_steps: int = 50  # model calls
    max_tool_calls: int = 500
    max_tokens: int = 1_000_000  # prompt + completion, summed over calls
    max_wall_s: float = 600.0
    context_tokens: int = 64_000  # budget for the messages sent
    max_repeats: int = 3  # identical tool calls allowed; the ones after the first get reminders


@dataclass
class AgentSummary:
    """What an agent's run leaves for others (a swarm's orchestrator, the journal): everything but the messages."""

    agent: str
    outcome: str  # one of OUTCOMES
    output: str
    reason: str = ""
    steps: int = 0
    tool_calls: int = 0
    wall_s: float = 0.0
    usage: Usage = field(default_factory=Usage)

    def as_dict(self) -> dict:
        return {"agent": self.agent, "outcome": self.outcome, "reason": self.reason, "output": self.output,
                "steps": self.steps, "tool_calls": self.tool_calls, "wall_s": round(self.wall_s, 4),
                "usage": self.usage.as_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "AgentSummary":
        return cls(**{**d, "usage": Usage(**d["usage"])})


@dataclass
class AgentResult:
    name: str
    outcome: str  # one of OUTCOMES
    output: str  # the final answer, or the last assistant text when stopped early
    reason: str = ""
    steps: int = 0
    tool_calls: int = 0
    wall_s: float = 0.0
    usage: Usage = field(default_factory=Usage)
    messages: list[dict] = field(default_factory=list)

    def summary(self) -> AgentSummary:
        return AgentSummary(self.name, self.outcome, self.output, self.reason, self.steps, self.tool_calls,
                            self.wall_s, self.usage)


class ToolBudget:
    """Tool calls left, shared by all agents of a swarm (an agent alone gets its own)."""

    def __init__(self, total: int):
        self.left = total

    def take(self, n: int) -> bool:
        if n > self.left:
            return False
        self.left -= n
        return True


def estimate_tokens(messages: list[dict]) -> int:
    """About 4 characters per token, counting text and tool-call arguments (cheap: runs before every call)."""
    chars = 0
    for m in messages:
        chars += len(m.get("content") or "") + len(m.get("reasoning_content") or "") + 16
        for c in m.get("tool_calls") or []:
            chars += len(c["function"]["name"]) + len(c["function"].get("arguments") or "") + 32
    return chars // 4


def fit_context(messages: list[dict], budget: int, keep_last: int = 2) -> int:
    """Truncate the oldest tool results (not the last `keep_last` messages) until under budget; returns how many."""
    done = 0
    for m in messages[:-keep_last]:
        if estimate_tokens(messages) <= budget:
            break
        if m["role"] == "tool" and not m["content"].startswith("[k2lab: truncated"):
            text = m["content"]
            m["content"] = (f"[k2lab: truncated {len(text)} chars of this tool result to keep the context under "
                            f"{budget} tokens] {text[:200]}")
            done += 1
    return done


class Agent:
    """One agent: a name, a system prompt, tools, limits. `await agent.run(task) -> AgentResult`."""

    def __init__(self, name: str, llm: LLM, system_prompt: str, tools: list[Tool] = (),
                 limits: AgentLimits = AgentLimits(), tracer: Tracer | None = None,
                 budget: ToolBudget | None = None, sampling: dict | None = None,
                 replay: list[dict] = (), on_message: Callable[[int, dict], None] | None = None):
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"agent {name}: duplicate tool names {names}")
        self.name, self.llm, self.system_prompt, self.limits = name, llm, system_prompt, limits
        self.tools = {t.name: t for t in tools}
        self.tracer, self.sampling = tracer, sampling or {}
        self.budget = budget or ToolBudget(limits.max_tool_calls)
        self.replay, self.on_message = list(replay), on_message  # resume: assistant messages already journaled

    def _span(self, kind: str, name: str, **fields):
        return self.tracer.span(kind, name, agent=self.name, **fields) if self.tracer else nullcontext({})

    async def run(self, task: str) -> AgentResult:
        res = AgentResult(self.name, "completed", "")
        res.messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": task}]
        t0 = time.perf_counter()
        with self._span("agent", self.name) as span:
            try:
                async with asyncio.timeout(self.limits.max_wall_s):
                    await self._loop(res)
            except TimeoutError:
                res.outcome, res.reason = "timed_out", f"wall time over {self.limits.max_wall_s}s"
            except EndpointError:  # nothing answers at the endpoint: a setup mistake that stops the whole run
                raise
            except Exception as e:  # model endpoint gave up, or a bug in a tool source: this agent fails alone
                res.outcome, res.reason = "failed", f"{type(e).__name__}: {e}"
            res.wall_s = time.perf_counter() - t0
            span.update(outcome=res.outcome, reason=res.reason, steps=res.steps, tool_calls=res.tool_calls)
        return res

    def _stop(self, res: AgentResult, reason: str) -> None:
        res.outcome, res.reason = "stopped", reason

    async def _loop(self, res: AgentResult) -> None:
        lim, specs = self.limits, [t.spec for t in self.tools.values()] or None
        seen: dict[str, int] = {}
        while True:
            if res.steps >= lim.max_steps:
                return self._stop(res, f"max_steps {lim.max_steps} reached")
            if res.usage.total_tokens >= lim.max_tokens:
                return self._stop(res, f"max_tokens {lim.max_tokens} reached ({res.usage.total_tokens} used)")
            fit_context(res.messages, lim.context_tokens)
            message, cut = await self._model(res, specs)
            res.messages.append(message)
            if message.get("content"):
                res.output = message["content"]
            calls = message.get("tool_calls") or []
            if not calls:
                if cut:  # not an answer: the output ran into max_tokens (a malformed call in it was dropped)
                    return self._stop(res, "the model's output was cut at max_tokens before an answer or a "
                                           "complete tool call; raise max_tokens")
                return
            if res.tool_calls + len(calls) > lim.max_tool_calls or not self.budget.take(len(calls)):
                return self._stop(res, f"tool call limit reached ({res.tool_calls} done, {len(calls)} more asked)")
            res.tool_calls += len(calls)
            outputs = await asyncio.gather(*(self._tool(c, res.steps - 1) for c in calls))
            stop = None
            for call, out in zip(calls, outputs, strict=True):
                key = call["function"]["name"] + call["function"].get("arguments", "")
                seen[key] = n = seen.get(key, 0) + 1
                if n > lim.max_repeats:
                    stop = f"repeated identical tool call {call['function']['name']} {n} times"
                elif n > 1:
                    out += (f"\n[k2lab: this exact call was already made {n - 1} time(s) and the result will not "
                            f"change; {'this is the last warning, ' if n == lim.max_repeats else ''}"
                            "try something different or give the final answer]")
                res.messages.append({"role": "tool", "tool_call_id": call["id"], "content": out})
            if stop:
                return self._stop(res, stop)

    async def _model(self, res: AgentResult, specs: list[dict] | None) -> tuple[dict, bool]:
        """The step's assistant message, and whether the model's output was cut at max_tokens."""
        step = res.steps
        res.steps += 1
        if step < len(self.replay):  # resumed run: this step's decision is already in the journal
            return self.replay[step], False
        with self._span("model", f"step {step}") as span:
            r = await self.llm.chat(res.messages, tools=specs, **self.sampling)
            span.update(r.usage, retries=r.retries, finish_reason=r.finish_reason)
        res.usage.add(r.usage["prompt_tokens"], r.usage["completion_tokens"], r.retries, r.usage["cost_usd"])
        if self.on_message:
            self.on_message(step, r.message)
        return r.message, r.finish_reason == "length"

    async def _tool(self, call: dict, step: int) -> str:
        name = call["function"]["name"]
        with self._span("tool", name):
            tool = self.tools.get(name)
            if tool is None:
                return f"error: no tool named {name!r}; available: {sorted(self.tools)}"
            return await tool(call["function"].get("arguments") or "{}", step)


def run_agent(task: str, llm: LLM, workspace: Path, mcp: list[str] = (), run_dir: Path | None = None,
              max_steps: int = 50, sampling: dict | None = None) -> AgentResult:
    """`k2lab agent`: one agent with the workspace tools (+ MCP tools) against `llm`'s endpoint; `sampling`: request
    fields of every model call (temperature, max_tokens; none: the endpoint's defaults)."""
    from k2lab.agents.mcp import MCPTools
    from k2lab.agents.sandbox import Sandbox
    from k2lab.agents.tools import workspace_tools

    run_dir = Path(run_dir or f"runs/agent-{time.strftime('%Y%m%d-%H%M%S')}")

    def show(step: int, m: dict) -> None:
        calls = ", ".join(c["function"]["name"] for c in m.get("tool_calls") or [])
        print(f"[step {step}] " + (f"tools: {calls}" if calls else (m.get("content") or "")[:200]), flush=True)

    async def go() -> AgentResult:
        async with llm, MCPTools(list(mcp)) as mcp_tools:
            # the run directory is made once the MCP servers are up: a command that cannot start leaves none
            tracer = Tracer(run_dir / "trace.jsonl")
            try:
                agent = Agent("agent", llm, "You are a capable assistant. Use the tools when they help; the "
                              "workspace is your working directory.", workspace_tools(Sandbox(workspace)) + mcp_tools,
                              AgentLimits(max_steps=max_steps), tracer, sampling=sampling, on_message=show)
                with tracer.span("run", "agent", task=task[:200]):
                    return await agent.run(task)
            finally:
                tracer.close()
    res = asyncio.run(go())
    write_json(run_dir / "result.json", res.summary().as_dict())
    return res
