"""`k2lab synth`: play tasks in their environments, check and grade each trajectory, keep or reject it.

A run directory holds run.json (the run's identity), kept.jsonl and rejected.jsonl (one trajectory per line:
OpenAI-format `messages` and `tools`, plus `rubric`, `verdicts`, `domain`, `task_id`, and for rejected ones
`reasons`) and the dataset card. Tasks are fixed by (domains, count, seed); a record is appended only when its
trajectory is complete, so after a crash `--resume` plays exactly the tasks that have no record yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import openai

from k2lab.runs import RunDirError, append_jsonl, claim, read_jsonl
from k2lab.synth import card, solver
from k2lab.synth.checks import k2_ids, roundtrip_errors, schema_errors
from k2lab.synth.domains import EMBEDDED, make_tasks, registry
from k2lab.synth.env import Environment, Task
from k2lab.synth.simulate import Truncated

Teacher = Callable[[list[dict], list[dict]], dict]  # (messages, tools) -> assistant message


def _record(env: Environment, reward: float, verdicts: list[dict]) -> dict:
    task = env.task
    return {"task_id": task.task_id, "domain": task.domain, "persona": task.persona, "messages": env.messages,
            "tools": env.tools, "rubric": task.rubric, "verdicts": verdicts, "reward": reward,
            "stats": {"turns": len(task.turns), "assistant_messages": env.steps, "tool_calls": len(env.calls),
                      "tool_faults": sum("fault" in c for c in env.calls),
                      "schema_errors": sum("schema_error" in c for c in env.calls)}}


def episode(env: Environment, teacher: Teacher) -> dict:
    """Play one episode; the record carries the conversation, rubric verdicts and tool-call statistics."""
    messages, tools = env.reset()
    try:
        done = False
        while not done:
            _, reward, done = env.step(teacher(list(env.messages), tools))
        verdicts = [v | {"judge": "programmatic rubric"} for v in env.verdicts()]
    finally:
        env.close()
    return _record(env, reward, verdicts)


async def llm_episode(env: Environment, llm) -> dict:
    """One episode with a model over the OpenAI API as the teacher (`LLM` from k2lab.agents.llm); a truncated
    reply or an endpoint that keeps failing ends it with a failed verdict instead of an exception."""
    messages, tools = env.reset()
    reward = 0.0
    try:
        done = False
        while not done:
            r = await llm.chat(env.messages, tools or None, temperature=0.0)
            if r.finish_reason == "length":
                raise Truncated("teacher reply truncated (finish_reason length)")
            _, reward, done = env.step(k2_ids(r.message, env.messages))
        verdicts = [v | {"judge": "programmatic rubric"} for v in env.verdicts()]
    except (Truncated, openai.APIError, ValueError) as e:
        verdicts = [{"checkpoint": "rollout", "passed": False, "judge": "format check",
                     "explanation": f"{type(e).__name__}: {str(e)[:200]}"}]
    finally:
        env.close()
    return _record(env, reward, verdicts)


def decide(record: dict) -> dict:
    """Add the format checks to the verdicts; accepted iff every verdict passed (reasons list the others)."""
    for name, errors in (("chat_roundtrip", roundtrip_errors(record["messages"], record["tools"])),
                         ("tool_schemas", schema_errors(record["messages"], record["tools"]))):
        record["verdicts"].append({"checkpoint": name, "passed": not errors, "judge": "format check",
                                   "explanation": "; ".join(errors[:3]) or "ok"})
    record["reasons"] = [f"{v['checkpoint']}: {v['explanation']}" for v in record["verdicts"] if not v["passed"]]
    record["accepted"] = not record["reasons"]
    return record


def parse_domains(spec: str) -> list[str]:
    names = [d.strip() for d in spec.split(",") if d.strip()]
    names = [x for d in names for x in (EMBEDDED if d == "embedded" else (d,))]
    unknown = [d for d in names if d not in EMBEDDED]
    if not names or unknown:
        raise ValueError(f"--domains: unknown {unknown or spec!r}; use 'embedded' or a comma list of {list(EMBEDDED)}")
    return list(dict.fromkeys(names))


def open_run(out: Path, identity: dict, resume: bool) -> set[str]:
    """Claim the run directory; the task ids already recorded (a resumed run skips them)."""
    if not resume and (out / "run.json").exists():
        raise RunDirError(f"{out} already holds a synth run; pass --resume to continue it or choose another --out")
    claim(out, identity, "synth")
    return {r["task_id"] for name in ("kept.jsonl", "rejected.jsonl") for r in read_jsonl(out / name)}


def record_trajectory(out: Path, record: dict) -> None:
    append_jsonl(out / ("kept.jsonl" if record["accepted"] else "rejected.jsonl"), record)


def run_embedded(domains: str, n_tasks: int, out: str | Path, seed: int = 0, fault_rate: float = 0.15,
                 resume: bool = False, llm=None, concurrency: int = 8) -> dict:
    """Synthesize `n_tasks` trajectories on the embedded domains; returns the card. The teacher is the
    rule-based solver, or `llm` (a model over the OpenAI API, for example to measure a trained model's task
    success: kept = tasks it solved)."""
    if n_tasks < 1 or concurrency < 1:
        raise ValueError(f"--tasks and --concurrency must be >= 1, got {n_tasks}, {concurrency}")
    names, out = parse_domains(domains), Path(out)
    teacher = llm.model if llm else solver.NAME
    identity = {"source": "embedded", "domains": names, "tasks": n_tasks, "seed": seed, "fault_rate": fault_rate,
                "teacher": teacher}
    done = open_run(out, identity, resume)
    reg = registry()
    tasks: list[Task] = [t for t in make_tasks(names, n_tasks, seed) if t.task_id not in done]
    if llm is None:
        for task in tasks:
            env = Environment(reg[task.domain], task, fault_rate=fault_rate, seed=seed)
            record = episode(env, lambda messages, tools, d=reg[task.domain], t=task: solver.solve(d, t, messages))
            record_trajectory(out, decide(record | {"teacher": teacher}))
        return card.write(out)

    async def play_all() -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(task: Task) -> None:
            async with sem:
                record = await llm_episode(Environment(reg[task.domain], task, fault_rate, seed), llm)
            record_trajectory(out, decide(record | {"teacher": teacher}))
        try:
            await asyncio.gather(*(one(t) for t in tasks))
        finally:
            await llm.aclose()
    asyncio.run(play_all())
    return card.write(out)
