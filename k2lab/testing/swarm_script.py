"""Scripted decisions for the swarm tests and bench/swarm.py, played back by the scripted test server (a test
double for the model, not a model): an orchestrator that creates N workers, assigns them all in one message and sums
their answers; worker i makes k_i `lookup` calls spread over 1 + i % 3 steps and answers the sum."""

from __future__ import annotations

import json
import re

from k2lab.agents.swarm import ORCHESTRATOR_PROMPT
from k2lab.agents.tools import tool


def plan(n_agents: int, n_tool_calls: int) -> list[int]:
    """Tool calls per worker so that the swarm makes n_tool_calls in all (2 per worker go to the orchestrator)."""
    rest = n_tool_calls - 2 * n_agents
    if rest < n_agents:
        raise ValueError(f"{n_tool_calls} tool calls are too few for {n_agents} workers")
    return [rest // n_agents + (1 if i < rest % n_agents else 0) for i in range(n_agents)]


def value(i: int, j: int) -> int:
    return (i * 31 + j * 7) % 101


@tool
async def lookup(i: int, j: int) -> int:
    """Look up entry j of worker i."""
    return value(i, j)


def expected(counts: list[int]) -> tuple[int, int]:
    """(sum of all answers, critical steps) the script must produce."""
    total = sum(value(i, j) for i, k in enumerate(counts) for j in range(k))
    worker_steps = max(1 + i % 3 + 1 for i in range(len(counts)))  # tool steps + the final answer
    return total, 1 + (1 + worker_steps) + 1  # create step, assign step, final step


def handler(counts: list[int], system: str = ORCHESTRATOR_PROMPT):
    def reply(req):
        if req.system == system:  # orchestrator
            if req.step == 0:
                return {"tool_calls": [{"name": "create_subagent",
                                        "arguments": {"name": f"w{i}", "system_prompt": f"worker {i}"}}
                                       for i in range(len(counts))]}
            if req.step == 1:
                return {"tool_calls": [{"name": "assign_task", "arguments": {"agent": f"w{i}", "prompt": f"k={k}"}}
                                       for i, k in enumerate(counts)]}
            results = [json.loads(m["content"]) for m in req.tool_results if m["content"].startswith("{")]
            ok = [r for r in results if r["outcome"] == "completed"]
            return {"content": f"total={sum(int(r['output']) for r in ok)} completed={len(ok)}/{len(results)}"}
        i, k = int(req.system.split()[1]), int(re.search(r"k=(\d+)", req.user).group(1))
        steps = 1 + i % 3
        if req.step < steps:  # spread k calls over `steps` messages
            js = [j for j in range(k) if j % steps == req.step]
            return {"tool_calls": [{"name": "lookup", "arguments": {"i": i, "j": j}} for j in js]}
        done = [int(m["content"]) for m in req.messages if m["role"] == "tool"]
        return {"content": str(sum(done))}
    return reply
