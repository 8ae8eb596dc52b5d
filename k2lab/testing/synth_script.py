"""Scripted replies for the synthesis tests and bench/synth.py, played back by the scripted test server (a test
double for every model role, not a model): tool designer, task writer, user simulator, tool simulator, teacher
and judges. Malformed replies are part of the script, keyed by markers so each test knows what to expect:

- designer: category "broken" -> never JSON; "truncated" -> cut off; other domains get 3 tools, one with an
  invalid JSON schema and one near-duplicate;
- task writer: the first reply for a domain whose name holds "flaky" is not JSON (the retry is valid); each
  agent gets one task per CASES entry, the case written into the goal as "[case]";
- teacher, by the case in the first user message: ok / unsure / fail / split -> a valid call of the agent's
  first tool, then an answer; bad-args -> a call that breaks the schema; truncated -> finish_reason length;
- tool simulator: {"result": ...} echoing the call and the outcome it was told to simulate; tools named *_list
  get a reply that is not JSON;
- judges: [fail] -> B, [unsure] -> D, [split] -> judge "judge-a" A and the others B; judge "judge-b" first
  answers without a grade letter (the Judge asks again).
"""

from __future__ import annotations

import json
import re

from k2lab.synth.simulate import TOOL_SIM, USER_SIM
from k2lab.synth.specs import DESIGNER
from k2lab.synth.stages import WRITER
from k2lab.testing.scripted_server import ScriptedRequest

CASES = ("ok", "bad-args", "truncated", "unsure", "fail", "split")
_CASE = re.compile(r"\[(" + "|".join(CASES) + r")\]")


def _case(text: str) -> str:
    m = _CASE.search(text)
    return m.group(1) if m else "ok"


def example(schema: dict) -> dict:
    """Arguments that satisfy a simple object schema (required properties only)."""
    out = {}
    for name in schema.get("required", []):
        p = schema.get("properties", {}).get(name, {})
        if "enum" in p:
            out[name] = p["enum"][0]
        elif "timezone" in name:
            out[name] = "Asia/Tokyo" if name.startswith("target") else "UTC"
        elif name == "time":
            out[name] = "12:00"
        else:
            out[name] = {"string": "demo", "integer": 1, "number": 1.5, "boolean": True, "array": [],
                         "object": {}}.get(p.get("type"), "demo")
    return out


def _designer(text: str) -> dict:
    if m := re.search(r"Category: (\S+)", text):
        cat = m.group(1)
        if cat == "broken":
            return {"content": "Sure! Here are some domains: travel, finance"}
        if cat == "truncated":
            return {"content": '{"domains": [{"name": "x', "finish_reason": "length"}
        return {"content": json.dumps({"domains": [{"name": f"{cat}_desk", "description": f"{cat} front desk"},
                                                   {"name": f"{cat}_flaky_ops", "description": f"{cat} operations"}]})}
    dom = re.search(r"Domain: (\S+)", text).group(1)
    item = {"type": "object", "properties": {"item_id": {"type": "string"}, "quantity": {"type": "integer"}},
            "required": ["item_id", "quantity"], "additionalProperties": False}
    tools = [{"name": f"{dom}_book", "description": f"Book an item in the {dom} system for a quantity.",
              "parameters": item, "reads": ["items"], "changes": ["bookings"]},
             {"name": f"{dom}_list", "description": f"List the {dom} bookings made so far with dates and owners.",
              "parameters": {"type": "object", "properties": {}}, "reads": ["bookings"]},
             {"name": f"{dom}_book_item", "description": f"Book an item in the {dom} system for a quantity.",
              "parameters": item},  # a near-duplicate of {dom}_book
             {"name": f"{dom}_broken", "description": "Has an invalid schema.",
              "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}}}]
    return {"content": "```json\n" + json.dumps({"tools": tools}) + "\n```"}


def _writer(text: str) -> dict:
    if "flaky" in text and "previous reply was rejected" not in text:
        return {"content": '{"tasks": [ {"goal": "unfinished'}
    tools = json.loads(re.search(r"Tools: (\[.*\])\nWrite", text, re.S).group(1))
    names = [t["name"] for t in tools]
    tasks = [{"goal": f"[{case}] Use {names[0]} to help me with my request.", "persona": "a busy shop owner, terse",
              "difficulty": "simple", "rubric": {"success_criteria": [f"calls {names[0]} and reports the result"],
                                                 "expected_tools": [names[0]], "checkpoints": ["tool called", "answered"]}}
             for case in CASES]
    return {"content": json.dumps({"tasks": tasks})}


def _user(req: ScriptedRequest) -> dict:
    goal = re.search(r"Your goal: (.*)", req.system).group(1)
    own = [m for m in req.messages if m["role"] == "assistant"]  # the user's own earlier messages (roles flipped)
    if not own:
        return {"content": goal}
    return {"content": "Thanks. Can you confirm that it worked?" if len(own) == 1 else "DONE"}


def _tool_sim(text: str) -> dict:
    call = re.search(r"Call: (\w+)\((.*)\)\nOutcome", text, re.S)
    if call.group(1).endswith("_list"):
        return {"content": "the list is empty"}
    outcome = re.search(r"Outcome to simulate: (a normal success|a partial failure|an edge case)", text).group(1)
    return {"content": json.dumps({"result": {"ok": outcome == "a normal success", "outcome": outcome,
                                              "tool": call.group(1), "arguments": json.loads(call.group(2))}})}


def _teacher(req: ScriptedRequest) -> dict:
    first_user = next(m["content"] for m in req.messages if m["role"] == "user")
    case = _case(first_user)
    last = req.messages[-1]
    if case == "truncated":
        return {"content": "I will now call the", "finish_reason": "length"}
    if last["role"] == "tool":
        return {"content": f"Done. The tool answered: {last['content'][:200]}"}
    tool = req.body["tools"][0]["function"]
    args = {"unexpected": 1} if case == "bad-args" else example(tool["parameters"])
    return {"tool_calls": [{"name": tool["name"], "arguments": args}]}


def _judge(req: ScriptedRequest) -> dict:
    text, model = req.user, req.body.get("model", "")
    case = _case(text)
    if model == "judge-b" and "did not end with a line" not in text:
        return {"content": "The trajectory looks reasonable overall."}
    letter = {"fail": "B", "unsure": "D", "split": "A" if model == "judge-a" else "B"}.get(case, "A")
    return {"content": f"Graded against the rubric.\n{letter}"}


def handler(req: ScriptedRequest) -> dict:
    system = req.system
    if system.startswith(DESIGNER):
        return _designer(req.user)
    if system.startswith(WRITER):
        return _writer(req.user)
    if system.startswith(USER_SIM):
        return _user(req)
    if system.startswith(TOOL_SIM):
        return _tool_sim(req.user)
    if req.user.startswith("You grade one agent trajectory"):
        return _judge(req)
    return _teacher(req)
