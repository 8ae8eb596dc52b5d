"""Swarm orchestration overhead: k2lab's swarm vs the OpenAI Agents SDK on the same scripted server.

The workload (k2lab/testing/swarm_script.py): an orchestrator creates N sub-agents, assigns all of them in one
message and sums their answers; sub-agent i makes its share of `lookup` calls over 1 + i % 3 steps. The
scripted server (a test double that answers after a fixed latency, run in its own process so its CPU time is not
charged to the client) plays back the same decisions to both frameworks. The critical-path bound is
critical steps x latency: no orchestrator can be faster without overlapping dependent model calls.

    python bench/swarm.py                       # 300 sub-agents, 4,000 tool calls, 1 s latency
    python bench/swarm.py --latency 3 --out bench/results/swarm_latency3.json

Timings on a shared 2-core machine are noisy; the two frameworks run back to back against the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from k2lab.agents.llm import LLM
from k2lab.agents.swarm import ORCHESTRATOR_PROMPT, Swarm, SwarmLimits
from k2lab.testing.scripted_server import ScriptedServer
from k2lab.testing.swarm_script import expected, handler, lookup, plan, value

RESULTS = Path(__file__).parent / "results" / "swarm.json"


def serve(latency: float, agents: int, tool_calls: int) -> None:
    """Child process: run the scripted server until stdin closes."""
    with ScriptedServer(handler(plan(agents, tool_calls)), latency=latency) as srv:
        print(srv.base_url, flush=True)
        sys.stdin.read()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(args) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--latency", str(args.latency), "--agents",
                             str(args.agents), "--tool-calls", str(args.tool_calls)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


async def run_k2lab(base_url: str, agents: int, tool_calls: int) -> dict:
    llm = LLM(base_url=base_url, api_key="bench", model="scripted", max_concurrency=1024)
    limits = SwarmLimits(max_subagents=agents, max_tool_calls=tool_calls, max_concurrency=agents)
    with tempfile.TemporaryDirectory() as run_dir:
        t0, c0 = time.perf_counter(), time.process_time()
        res = await Swarm(llm, lambda run_dir, name: [lookup], limits).run("sum all entries", Path(run_dir))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await llm.aclose()
    return {"output": res.output, "wall_s": wall, "cpu_s": cpu, "tool_calls": res.metrics.tool_calls,
            "model_calls": res.metrics.model_calls, "critical_steps": res.metrics.critical_steps}


async def run_openai_agents(base_url: str, agents: int) -> dict:
    """The same workload as agents-as-tools in the OpenAI Agents SDK: assign_task runs a sub-agent with
    Runner.run; the SDK runs the tool calls of one message concurrently (asyncio tasks, gathered)."""
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI, DefaultAioHttpClient

    set_tracing_disabled(True)
    # the same HTTP transport as k2lab's LLM, so the comparison is about orchestration
    client = AsyncOpenAI(base_url=base_url, api_key="bench", http_client=DefaultAioHttpClient())
    model = OpenAIChatCompletionsModel("scripted", client)
    subagents: dict[str, Agent] = {}
    counts = {"tool_calls": 0, "model_calls": 0}

    @function_tool(name_override="lookup")
    async def sdk_lookup(i: int, j: int) -> int:
        """Look up entry j of worker i."""
        counts["tool_calls"] += 1
        return value(i, j)

    @function_tool
    def create_subagent(name: str, system_prompt: str) -> str:
        """Create a sub-agent with its own system prompt."""
        counts["tool_calls"] += 1
        subagents[name] = Agent(name=name, instructions=system_prompt, model=model, tools=[sdk_lookup])
        return f"created sub-agent {name}"

    @function_tool
    async def assign_task(agent: str, prompt: str) -> str:
        """Give a sub-agent a task; returns its final output and outcome."""
        counts["tool_calls"] += 1
        result = await Runner.run(subagents[agent], prompt, max_turns=30)
        counts["model_calls"] += len(result.raw_responses)
        return json.dumps({"agent": agent, "outcome": "completed", "output": result.final_output})

    orchestrator = Agent(name="orchestrator", instructions=ORCHESTRATOR_PROMPT, model=model,
                         tools=[create_subagent, assign_task])
    t0, c0 = time.perf_counter(), time.process_time()
    result = await Runner.run(orchestrator, "sum all entries", max_turns=50)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    counts["model_calls"] += len(result.raw_responses)
    await client.close()
    return {"output": result.final_output, "wall_s": wall, "cpu_s": cpu, **counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=300)
    ap.add_argument("--tool-calls", type=int, default=4000)
    ap.add_argument("--latency", type=float, default=1.0, help="seconds the server waits before each answer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the JSON results go")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.latency, args.agents, args.tool_calls)

    total, critical = expected(plan(args.agents, args.tool_calls))
    want = f"total={total} completed={args.agents}/{args.agents}"
    bound = critical * args.latency
    runs: dict[str, list[dict]] = {"k2lab": [], "openai-agents": []}
    proc, base_url = start_server(args)
    try:
        for rep in range(args.repeats):
            for name in runs:
                coro = (run_k2lab(base_url, args.agents, args.tool_calls) if name == "k2lab"
                        else run_openai_agents(base_url, args.agents))
                s0 = cpu_seconds(proc.pid)
                r = asyncio.run(coro)
                r["server_cpu_s"] = cpu_seconds(proc.pid) - s0
                if r["output"] != want:
                    raise SystemExit(f"{name} gave {r['output']!r}, expected {want!r}")
                r["overhead_ms_per_tool_call"] = 1e3 * (r["wall_s"] - bound) / r["tool_calls"]
                r["cpu_ms_per_tool_call"] = 1e3 * r["cpu_s"] / r["tool_calls"]
                runs[name].append(r)
                print(f"[{rep + 1}/{args.repeats}] {name:14s} wall {r['wall_s']:.2f}s  cpu {r['cpu_s']:.2f}s  "
                      f"server cpu {r['server_cpu_s']:.2f}s  tool calls {r['tool_calls']}  "
                      f"model calls {r['model_calls']}", flush=True)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])
    summary = {name: {k: med(name, k) for k in ("wall_s", "cpu_s", "server_cpu_s", "overhead_ms_per_tool_call",
                                                "cpu_ms_per_tool_call")} | {"wall_over_bound": med(name, "wall_s") / bound}
               for name in runs}
    out = {"workload": {"subagents": args.agents, "tool_calls": args.tool_calls, "latency_s": args.latency,
                        "critical_steps": critical, "critical_path_bound_s": bound, "repeats": args.repeats},
           "median": summary, "k2lab_vs_openai_agents_wall": summary["k2lab"]["wall_s"] / summary["openai-agents"]["wall_s"],
           "targets": {"wall_over_bound_max": 1.3, "overhead_ms_per_tool_call_max": 2.0},
           "runs": runs, "machine": f"{os.cpu_count()} CPUs, shared; server in its own process"}
    print(f"\ncritical steps {critical} x latency {args.latency}s = bound {bound:.2f}s  (medians of {args.repeats})")
    print(f"{'':16s}{'wall s':>9s}{'/bound':>8s}{'overhead ms/tool call':>23s}{'cpu ms/tool call':>18s}"
          f"{'server cpu s':>14s}")
    for name, s in summary.items():
        print(f"{name:16s}{s['wall_s']:>9.2f}{s['wall_over_bound']:>8.2f}{s['overhead_ms_per_tool_call']:>23.3f}"
              f"{s['cpu_ms_per_tool_call']:>18.3f}{s['server_cpu_s']:>14.2f}")
    print(f"k2lab wall / openai-agents wall: {out['k2lab_vs_openai_agents_wall']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
