"""The LLM path of `k2lab synth`: tools -> agents -> tasks with rubrics -> simulated trajectories -> judges.

Every model call goes through the agents' `LLM` client (OpenAI API, retries with backoff on 429/5xx/timeouts,
AIMD concurrency), so any teacher works: `k2lab serve`, vLLM, a hosted model. Malformed replies never crash a
run: a spec or task reply that is not valid JSON is asked again once, then rejected with its reason; a
truncated teacher, user or tool-simulator reply rejects that trajectory with its reason; a tool call that
breaks its schema gets an error observation and fails the format check. Judges (the evals' `Judge` and `vote`)
grade each trajectory against its rubric: A keeps it, B or C rejects it, D, no grade or a tie sends it to the
human queue (queue.jsonl, reviewed with `k2lab review OUT`).

Resume: tools.jsonl is written once when the tools stage ends; tasks.jsonl gets one record per agent; each
trajectory is appended to kept, rejected or queue when it is finished; a resumed run skips whatever has a record.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import openai

from k2lab.evals.judge import Judge, vote
from k2lab.runs import append_jsonl, read_jsonl, rewrite_jsonl, write_json
from k2lab.synth import card, specs
from k2lab.synth.checks import k2_ids
from k2lab.synth.pipeline import decide, open_run
from k2lab.synth.simulate import OUTCOMES, SimulatedEnvironment, Truncated

WRITER = "You are the TASK WRITER of a data-synthesis pipeline. Reply with JSON only, no prose."
TASKS_SCHEMA = {"type": "object", "required": ["tasks"], "properties": {"tasks": {"type": "array", "items": {
    "type": "object", "required": ["goal", "persona", "rubric"], "properties": {
        "goal": {"type": "string", "minLength": 8}, "persona": {"type": "string", "minLength": 2},
        "difficulty": {"enum": ["simple", "complex"]},
        "rubric": {"type": "object", "required": ["success_criteria", "expected_tools", "checkpoints"], "properties": {
            "success_criteria": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "expected_tools": {"type": "array", "items": {"type": "string"}},
            "checkpoints": {"type": "array", "minItems": 1, "items": {"type": "string"}}}}}}}}}
JUDGE_PROMPT = """\
You grade one agent trajectory against its task's rubric.

Task and rubric: {question}
Success criteria: {gold}
Trajectory:
{answer}

Grade A if the trajectory meets every success criterion and checkpoint with the expected tool use, B if it fails
the task, C if it meets only part of it, D if you cannot tell. Reply with one short sentence explaining the grade,
then a last line holding only the letter A, B, C or D.
"""
DECISION = {"A": "accept", "B": "reject", "C": "reject", "D": "unsure", None: "unsure"}
ROLLOUT_FAILURES = (Truncated, specs.SpecError, openai.APIError, ValueError)


def make_agents(catalog: list[dict], max_tools: int = 6) -> list[dict]:
    """One agent per (source, domain): a system prompt and a coherent subset of at most `max_tools` tools."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for t in catalog:
        groups.setdefault((t["source"], t["domain"]), []).append(t)
    agents = []
    for (source, domain), tools in sorted(groups.items()):
        for k in range(0, len(tools), max_tools):
            part = tools[k:k + max_tools]
            agents.append({"agent_id": f"{source}:{domain}:{k // max_tools}", "source": source, "domain": domain,
                           "tools": [t["name"] for t in part],
                           "system": f"You are an assistant for {domain}. Use the tools "
                                     f"({', '.join(t['name'] for t in part)}) when they help, check their results, "
                                     f"retry a call that failed transiently, and tell the user plainly what you did."})
    return agents


async def write_tasks(llm, agent: dict, catalog: dict, n: int) -> dict:
    """The task writer's tasks for one agent, validated; a record {agent_id, tasks, rejected, usage}."""
    tools = [catalog[name]["spec"]["function"] for name in agent["tools"]]
    prompt = (f"Agent: {agent['system']}\nTools: {json.dumps(tools)}\nWrite {n} tasks, simple to complex, as "
              '{"tasks": [{"goal", "persona", "difficulty": "simple"|"complex", "rubric": {"success_criteria": [..], '
              '"expected_tools": [tool names], "checkpoints": [..]}}]}.')
    out = {"agent_id": agent["agent_id"], "tasks": [], "rejected": [], "usage": {}}
    obj, note = None, ""
    for _ in range(2):
        r = await llm.chat([{"role": "system", "content": WRITER}, {"role": "user", "content": prompt + note}],
                           temperature=0.7)
        specs.add_usage(out["usage"], r)
        try:
            obj = specs.parse_json(r.message.get("content") if r.finish_reason != "length" else None, "tasks")
            jsonschema.validate(obj, TASKS_SCHEMA)
            break
        except (specs.SpecError, jsonschema.ValidationError) as e:
            obj = None
            reason = getattr(e, "message", str(e))
            out["rejected"].append({"stage": "tasks", "agent": agent["agent_id"], "reason": reason})
            note = f"\n\nYour previous reply was rejected: {reason}. Reply with one complete JSON object."
    for i, t in enumerate((obj or {}).get("tasks", [])[:n]):
        unknown = [x for x in t["rubric"]["expected_tools"] if x not in agent["tools"]]
        if unknown:
            out["rejected"].append({"stage": "tasks", "agent": agent["agent_id"],
                                    "reason": f"rubric expects tools the agent lacks: {unknown}"})
            continue
        out["tasks"].append(t | {"task_id": f"{agent['agent_id']}:{i}", "agent_id": agent["agent_id"]})
    return out


def transcript(messages: list[dict]) -> str:
    lines = []
    for m in messages[1:]:
        for tc in m.get("tool_calls") or []:
            lines.append(f"ASSISTANT CALLS {tc['function']['name']}({tc['function']['arguments']})")
        if m.get("content"):
            lines.append(f"{'TOOL RESULT' if m['role'] == 'tool' else m['role'].upper()}: {m['content']}")
    return "\n".join(lines)


async def judge(record: dict, judges: list[Judge]) -> dict:
    rubric = record["rubric"]
    grades = await asyncio.gather(*(j.grade(f"{record['goal']}\nRubric: {json.dumps(rubric)}",
                                            "; ".join(rubric["success_criteria"]), transcript(record["messages"]))
                                    for j in judges))
    letter, tie = vote([g["grade"] for g in grades])
    record["verdicts"] += [{"checkpoint": "rubric", "judge": g["judge"], "grade": g["grade"],
                            "passed": g["grade"] == "A", "explanation": g["explanation"]} for g in grades]
    record["decision"] = "unsure" if tie else DECISION[letter]
    return record


async def trajectory(task: dict, agent: dict, catalog: dict, llms: dict, live: dict, judges: list[Judge],
                     fault_rate: float, seed: int) -> dict:
    """Roll out one task (teacher <-> simulated user and tools), check it, judge it; never raises for bad replies."""
    env = SimulatedEnvironment(task, agent, catalog, llms["user"], llms["tool"], live, fault_rate, seed)
    record = {"task_id": task["task_id"], "domain": agent["domain"], "tool_source": agent["source"],
              "persona": task["persona"], "goal": task["goal"], "rubric": task["rubric"], "teacher": llms["teacher"].model,
              "verdicts": [], "messages": [], "tools": env.tools}
    try:
        messages, tools = await env.reset()
        done = False
        while not done:
            r = await llms["teacher"].chat(env.messages, tools, temperature=0.7)
            specs.add_usage(env.usage.setdefault("teacher", {}), r)
            if r.finish_reason == "length":
                raise Truncated("teacher reply truncated (finish_reason length)")
            _, _, done = await env.step(k2_ids(r.message, env.messages))
    except ROLLOUT_FAILURES as e:
        record.update(messages=getattr(env, "messages", []), usage=env.usage, accepted=False, decision="reject",
                      reasons=[f"rollout: {type(e).__name__}: {str(e)[:200]}"],
                      stats={"turns": 0, "assistant_messages": 0, "tool_calls": 0, "tool_faults": 0, "schema_errors": 0})
        return record
    record.update(messages=env.messages, usage=env.usage, ended=env.ended, reward=0.0, stats={
        "turns": sum(m["role"] == "user" for m in env.messages), "assistant_messages": env.steps,
        "tool_calls": len(env.calls), "tool_faults": sum("fault" in c for c in env.calls),
        "schema_errors": sum("schema_error" in c for c in env.calls),
        "executed": {k: sum(c.get("executed") == k for c in env.calls) for k in ("mcp", "simulated")},
        "simulated_outcomes": {k: sum(c.get("outcome") == k for c in env.calls) for k in OUTCOMES}})
    decide(record)
    if not record["accepted"]:
        record["decision"] = "reject"
        return record
    try:
        await judge(record, judges)
        record["reasons"] = [] if record["decision"] == "accept" else [f"judges: {record['decision']}"]
    except ROLLOUT_FAILURES as e:  # no verdict from the judges: a person decides
        record["decision"], record["reasons"] = "unsure", [f"judges failed: {type(e).__name__}: {str(e)[:200]}"]
    record["accepted"] = record["decision"] == "accept"
    record["reward"] = float(record["accepted"])
    return record


def _sum(usages) -> dict:
    out: dict = {}
    for u in usages:
        for k, v in u.items():
            out[k] = out.get(k, 0) + v
    return out


def stages_summary(out: Path, judges: list[Judge]) -> dict:
    tools_stage = next(iter(read_jsonl(out / "stages.jsonl")), {})
    per_agent = read_jsonl(out / "tasks.jsonl")
    records = [r for f in ("kept.jsonl", "rejected.jsonl", "queue.jsonl") for r in read_jsonl(out / f)]
    roles = {role: _sum(r["usage"].get(role, {}) for r in records) for role in ("teacher", "user_simulator",
                                                                              "tool_simulator")}
    judged = [r for r in records if r.get("decision") != "reject" or any(v.get("grade") for v in r["verdicts"])]
    return {
        "tools": {"in": tools_stage.get("in"), "out": tools_stage.get("out"), "usage": tools_stage.get("usage")},
        "tasks": {"in": len(per_agent), "out": sum(len(a["tasks"]) for a in per_agent),
                  "usage": _sum(a["usage"] for a in per_agent)},
        "rollout": {"in": len(records), "out": sum(not any(x.startswith("rollout") for x in r.get("reasons", []))
                                                   for r in records), "usage": roles},
        "judges": {"in": len(judged), "out": sum(r["decision"] == "accept" for r in records),
                   "queued": sum(r["decision"] == "unsure" for r in records),
                   "usage_this_session": _sum(j.llm.usage.as_dict() for j in judges)},
    }


async def run_llm(out: str | Path, llms: dict, judges: list[Judge], mcp_tools: list, tool_files: list[str],
                  categories: list[str], tasks_per_agent: int, identity: dict, concurrency: int = 8,
                  fault_rate: float = 0.1, seed: int = 0, resume: bool = False) -> dict:
    out = Path(out)
    done = open_run(out, identity, resume) | {r["task_id"] for r in read_jsonl(out / "queue.jsonl")}
    live = {t.name: t for t in mcp_tools}
    if not (out / "tools.jsonl").exists():
        entries, rejected = specs.from_mcp(mcp_tools), []
        for f in tool_files:
            ok, bad = specs.from_json_file(f)
            entries, rejected = entries + ok, rejected + bad
        synthetic, bad, usage = await specs.evolve(llms["designer"], categories)
        entries, dropped = specs.dedupe(entries + synthetic)
        append_jsonl(out / "stages.jsonl", {"stage": "tools", "in": len(entries) + len(dropped) + len(bad + rejected),
                                            "out": len(entries), "usage": usage, "rejected": rejected + bad + dropped})
        rewrite_jsonl(out / "tools.jsonl", entries)
    catalog = {t["name"]: t for t in read_jsonl(out / "tools.jsonl")}
    agents = make_agents(list(catalog.values()))
    have = {a["agent_id"] for a in read_jsonl(out / "tasks.jsonl")}
    for rec in await asyncio.gather(*(write_tasks(llms["writer"], a, catalog, tasks_per_agent)
                                      for a in agents if a["agent_id"] not in have)):
        append_jsonl(out / "tasks.jsonl", rec)
    by_agent = {a["agent_id"]: a for a in agents}
    todo = [t for a in read_jsonl(out / "tasks.jsonl") for t in a["tasks"] if t["task_id"] not in done]
    sem = asyncio.Semaphore(concurrency)

    async def one(task):
        async with sem:
            rec = await trajectory(task, by_agent[task["agent_id"]], catalog, llms, live, judges, fault_rate, seed)
        name = {"accept": "kept", "reject": "rejected", "unsure": "queue"}[rec["decision"]]
        append_jsonl(out / f"{name}.jsonl", rec)
    await asyncio.gather(*(one(t) for t in todo))
    write_json(out / "stages.json", stages_summary(out, judges))
    return card.write(out)


def main(out: str | Path, base_url: str | None, api_key: str | None, model: str | None, judge_models: list[str],
         mcp: list[str], tool_files: list[str], categories: list[str], tasks_per_agent: int, concurrency: int,
         fault_rate: float, seed: int, resume: bool, backoff: tuple[float, float] = (0.5, 20.0),
         price_per_mtok: tuple[float, float] = (0.0, 0.0)) -> dict:
    """`k2lab synth` with an LLM: one endpoint plays every role (each role its own client, for usage per stage)."""
    from k2lab.agents.llm import LLM
    from k2lab.agents.mcp import MCPTools

    if tasks_per_agent < 1 or concurrency < 1:
        raise ValueError(f"--tasks-per-agent and --concurrency must be >= 1, got {tasks_per_agent}, {concurrency}")

    def client(name: str | None = None) -> LLM:
        return LLM(base_url, api_key, name or model, max_concurrency=concurrency, backoff=backoff,
                   price_per_mtok=price_per_mtok)
    llms = {role: client() for role in ("designer", "writer", "user", "tool", "teacher")}
    judges = [Judge(client(m), name=f"judge{i}:{m}", prompt=JUDGE_PROMPT) for i, m in enumerate(judge_models or [llms["teacher"].model])]
    identity = {"source": "llm", "model": llms["teacher"].model, "judges": [j.llm.model for j in judges], "mcp": mcp,
                "tool_files": [str(f) for f in tool_files], "categories": categories,
                "tasks_per_agent": tasks_per_agent, "fault_rate": fault_rate, "seed": seed}

    async def go() -> dict:
        async with MCPTools(mcp) as mcp_tools:
            try:
                return await run_llm(out, llms, judges, mcp_tools, tool_files, categories, tasks_per_agent,
                                     identity, concurrency, fault_rate, seed, resume)
            finally:
                for c in list(llms.values()) + [j.llm for j in judges]:
                    await c.aclose()
    return asyncio.run(go())
