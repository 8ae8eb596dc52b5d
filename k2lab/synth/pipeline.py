"""`k2lab synth`: play tasks in their environments, check and grade each trajectory, keep or reject it.

A run directory holds run.json (the run's identity), kept.jsonl and rejected.jsonl (one trajectory per line:
OpenAI-format `messages` and `tools`, plus `rubric`, `verdicts`, `domain`, `task_id`, and for rejected ones
`reasons`) and the dataset card. Tasks are fixed by (domains, count, seed); a record is appended only when its
trajectory is complete, so after a crash `--resume` plays exactly the tasks that have no record yet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from k2lab.runs import RunDirError, append_jsonl, claim, read_jsonl
from k2lab.synth import card, solver
from k2lab.synth.checks import roundtrip_errors, schema_errors
from k2lab.synth.domains import EMBEDDED, make_tasks, registry
from k2lab.synth.env import Environment, Task

Teacher = Callable[[list[dict], list[dict]], dict]  # (messages, tools) -> assistant message


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
    task = env.task
    return {"task_id": task.task_id, "domain": task.domain, "persona": task.persona, "messages": env.messages,
            "tools": tools, "rubric": task.rubric, "verdicts": verdicts, "reward": reward,
            "stats": {"turns": len(task.turns), "assistant_messages": env.steps, "tool_calls": len(env.calls),
                      "tool_faults": sum("fault" in c for c in env.calls),
                      "schema_errors": sum("schema_error" in c for c in env.calls)}}


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
                 resume: bool = False) -> dict:
    """Synthesize `n_tasks` trajectories on the embedded domains with the rule-based solver; returns the card."""
    if n_tasks < 1:
        raise ValueError(f"--tasks must be >= 1, got {n_tasks}")
    names, out = parse_domains(domains), Path(out)
    identity = {"source": "embedded", "domains": names, "tasks": n_tasks, "seed": seed, "fault_rate": fault_rate,
                "teacher": solver.NAME}
    done = open_run(out, identity, resume)
    reg = registry()
    tasks: list[Task] = make_tasks(names, n_tasks, seed)
    for task in tasks:
        if task.task_id in done:
            continue
        domain = reg[task.domain]
        env = Environment(domain, task, fault_rate=fault_rate, seed=seed)
        record = episode(env, lambda messages, tools, d=domain, t=task: solver.solve(d, t, messages))
        record_trajectory(out, decide(record | {"teacher": solver.NAME}))
    return card.write(out)
