"""Synthesis throughput: trajectories per minute at concurrency 1, 8 and 32 against the scripted server.

The workload is the LLM path's trajectory stage (k2lab/synth/stages.py `trajectory`): simulated user <-> teacher
<-> tool simulator, format checks and two judges, for tasks written by the scripted task writer
(k2lab/testing/synth_script.py; a test double that answers after a fixed latency, run in its own process so
its CPU time is not charged to the client). The reference is concurrency 1 in the same process; rounds
alternate the concurrency levels and the medians are reported. Per-stage overhead is the time inside each
role's chat calls beyond the server's fixed latency, per call, and the time per trajectory outside chat calls
(environment, schema validation, render/parse round trip, vote).

    python bench/synth.py                      # 0.25 s latency, 128 trajectories per level (8 at concurrency 1)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from k2lab.agents.llm import LLM
from k2lab.evals.judge import Judge
from k2lab.runs import write_json
from k2lab.synth import specs
from k2lab.synth.stages import JUDGE_PROMPT, make_agents, trajectory, write_tasks
from k2lab.testing.scripted_server import ScriptedServer
from k2lab.testing.synth_script import handler

RESULTS = Path(__file__).parent / "results" / "synth.json"
LEVELS = (1, 8, 32)


class Timed:
    """An LLM wrapper that adds up the time spent inside chat calls (for per-stage overhead)."""

    def __init__(self, llm: LLM):
        self.llm, self.model, self.calls, self.seconds = llm, llm.model, 0, 0.0

    async def chat(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return await self.llm.chat(*args, **kwargs)
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - t0


def serve(latency: float) -> None:
    with ScriptedServer(handler, latency=latency) as srv:
        print(srv.base_url, flush=True)
        sys.stdin.read()


async def workload(base_url: str, n: int) -> tuple[dict, list[dict], dict]:
    """Tools and tasks (written once), ok-case tasks only so every trajectory runs to the judges."""
    llm = LLM(base_url, "k", "scripted", backoff=(0.01, 0.05))
    tools, _, _ = await specs.evolve(llm, ["travel", "shop", "bank", "clinic"])
    catalog = {t["name"]: t for t in specs.dedupe(tools)[0]}
    agents = make_agents(list(catalog.values()))
    tasks = []
    while len(tasks) < n:
        for a in agents:
            rec = await write_tasks(llm, a, catalog, 6)
            tasks += [t | {"task_id": f"{t['task_id']}:{len(tasks)}"} for t in rec["tasks"] if t["goal"].startswith("[ok]")]
    await llm.aclose()
    return catalog, tasks[:n], {a["agent_id"]: a for a in agents}


async def run_level(base_url: str, concurrency: int, catalog, tasks, agents) -> dict:
    llm = LLM(base_url, "k", "scripted", max_concurrency=64, backoff=(0.01, 0.05))  # one connection pool
    roles = {r: Timed(llm) for r in ("teacher", "user", "tool", "judge")}
    judges = [Judge(roles["judge"], name=f"judge-{i}", prompt=JUDGE_PROMPT) for i in range(2)]
    sem = asyncio.Semaphore(concurrency)

    async def one(task):
        async with sem:
            return await trajectory(task, agents[task["agent_id"]], catalog, roles, {}, judges, 0.0, 0)
    t0 = time.perf_counter()
    recs = await asyncio.gather(*(one(t) for t in tasks))
    wall = time.perf_counter() - t0
    await llm.aclose()
    assert all(r["accepted"] for r in recs), [r["reasons"] for r in recs if not r["accepted"]][:3]
    return {"wall_s": wall, "per_min": 60 * len(recs) / wall,
            "calls": {k: v.calls for k, v in roles.items()}, "chat_s": {k: v.seconds for k, v in roles.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.25)
    ap.add_argument("--trajectories", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.latency)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--latency", str(args.latency)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    base_url = proc.stdout.readline().strip()
    try:
        catalog, tasks, agents = asyncio.run(workload(base_url, args.trajectories))
        runs: dict[int, list[dict]] = {c: [] for c in LEVELS}
        for _ in range(args.rounds):
            for c in LEVELS:  # alternate the levels so drift in machine load hits all of them alike
                # concurrency 1 runs 8 tasks: its rate, not its total, is what is compared
                part = tasks[:8] if c == 1 else tasks
                runs[c].append(asyncio.run(run_level(base_url, c, catalog, part, agents)))
                print(f"concurrency {c:2d}: {runs[c][-1]['per_min']:.0f} trajectories/min", flush=True)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    per_min = {c: statistics.median(r["per_min"] for r in rs) for c, rs in runs.items()}
    ref = runs[1][len(runs[1]) // 2]
    n_ref = 8
    overhead = {role: round(1000 * (ref["chat_s"][role] / ref["calls"][role] - args.latency), 2)
                for role in ref["calls"] if ref["calls"][role]}
    local = (ref["wall_s"] - sum(ref["chat_s"].values()) + ref["chat_s"]["judge"] / 2) / n_ref  # judges run in parallel
    out = {"latency_s": args.latency, "trajectories": args.trajectories, "rounds": args.rounds,
           "trajectories_per_min": {str(c): round(v, 1) for c, v in per_min.items()},
           "speedup_vs_concurrency_1": {str(c): round(v / per_min[1], 2) for c, v in per_min.items()},
           "calls_per_trajectory": {k: round(v / n_ref, 2) for k, v in ref["calls"].items()},
           "overhead_ms_per_call_beyond_latency": overhead,
           "local_s_per_trajectory_outside_chat_calls": round(local, 4)}
    print(json.dumps(out, indent=2))
    write_json(args.out, out)


if __name__ == "__main__":
    main()
