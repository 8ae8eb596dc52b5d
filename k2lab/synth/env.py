"""Environments: one task of one domain, played as `reset() -> (messages, tools)` and
`step(assistant message) -> (observation messages, reward, done)`.

The same object is the synthesis stage's tool and user simulator and an RL environment. Tool calls are
validated against their JSON schema and executed by the domain's real code against the episode's state (the
world model); a seeded fraction `fault_rate` of calls fails with a transient error first (controlled
stochasticity), and domains raise `ToolError` for edge cases (a missing city, too little stock). The user side
is the task's scripted turns in its persona's words: each final answer (an assistant message without tool
calls) ends a turn; the episode ends after the last turn or `max_steps` assistant messages. The reward is the
share of the rubric's checkpoints that pass; `verdicts()` says which and why.
"""

from __future__ import annotations

import copy
import json
import random
import re
from dataclasses import dataclass, field

import jsonschema

TRANSIENT = "error: transient failure"
ABSTAIN_PHRASES = ("i don't know", "i do not know", "no reliable information", "i'm not sure", "i am not sure",
                   "cannot answer", "can't answer")


_COMMITS = re.compile(r"\d|\b(but|think|believe|probably|maybe|likely|guess|perhaps)\b", re.I)


class ToolError(Exception):
    """A tool's own failure (an edge case of the world); its message goes back to the model."""


@dataclass
class Task:
    task_id: str
    domain: str
    system: str
    turns: list[str]  # the user's messages, one per turn, in the persona's words
    rubric: dict  # success_criteria [str], expected_tools [name], checkpoints [{id, kind, turn?, ...}]
    world: dict = field(default_factory=dict)  # what the domain needs to build the episode's state
    persona: str = ""

    def as_dict(self) -> dict:
        return {"task_id": self.task_id, "domain": self.domain, "system": self.system, "turns": self.turns,
                "rubric": self.rubric, "world": self.world, "persona": self.persona}


def is_abstention(text: str) -> bool:
    low = text.lower().replace("\u2019", "'")
    return any(p in low for p in ABSTAIN_PHRASES)


def numbers(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)]


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower()))


def check_answer(cp: dict, answer: str) -> tuple[bool, str]:
    """One answer checkpoint: `number` (+ `tolerance`), `contains` (all of, and none of `excludes`), or
    `abstain`."""
    if cp["kind"] == "abstain":
        if not is_abstention(answer):
            return False, "does not abstain on a question it cannot know"
        if _COMMITS.search(answer):  # "I'm not sure, but I think it was 1620" is a guess, not an abstention
            return False, "wraps a guess in an abstention phrase"
        return True, "abstains"
    if cp["kind"] == "number":
        tol = cp.get("tolerance", 0.01)
        found = numbers(answer)
        ok = any(abs(x - cp["number"]) <= tol for x in found)
        return ok, f"states {cp['number']}" if ok else f"expected {cp['number']} (+-{tol}), found {found[:6]}"
    words = f" {_words(answer)} "
    missing = [s for s in cp["contains"] if f" {_words(s)} " not in words]  # whole words: "4" is not in "42"
    named = [s for s in cp.get("excludes", ()) if f" {_words(s)} " in words]
    if not missing and named:  # "README.md, notes/todo.txt or notes/meeting.txt" is not an answer
        return False, f"also names {named}"
    if not missing and cp.get("not_abstain", True) and is_abstention(answer):
        return False, "hedges into an abstention while answering"
    return not missing, "mentions " + ", ".join(cp["contains"]) if not missing else f"does not mention {missing}"


class Environment:
    """One episode of `task` in `domain` (see the module docstring)."""

    def __init__(self, domain, task: Task, fault_rate: float = 0.0, seed: int = 0, max_steps: int = 16):
        if not 0.0 <= fault_rate < 1.0:
            raise ValueError(f"fault_rate must be in [0, 1), got {fault_rate}")
        self.domain, self.task, self.fault_rate, self.max_steps = domain, task, fault_rate, max_steps
        self.rng = random.Random(f"faults:{seed}:{task.task_id}")
        self.tools = copy.deepcopy(domain.task_tools(task))
        self._validators = {t["function"]["name"]: jsonschema.Draft202012Validator(t["function"]["parameters"])
                            for t in self.tools}
        self.state = None

    def reset(self) -> tuple[list[dict], list[dict]]:
        self.close()
        self.state = self.domain.initial_state(self.task)
        self.messages = [{"role": "system", "content": self.task.system},
                         {"role": "user", "content": self.task.turns[0]}]
        self.turn, self.steps, self.answers, self.calls = 0, 0, [], []
        self.done = False
        return copy.deepcopy(self.messages), copy.deepcopy(self.tools)

    def step(self, message: dict) -> tuple[list[dict], float, bool]:
        if self.state is None or self.done:
            raise RuntimeError("step() before reset() or after the episode ended")
        message = {k: v for k, v in message.items() if k in ("role", "content", "tool_calls", "reasoning_content")}
        self.messages.append(message)
        self.steps += 1
        obs: list[dict] = []
        if message.get("tool_calls"):
            obs = [self._call(tc) for tc in message["tool_calls"]]
        else:
            self.answers.append(message.get("content") or "")
            self.turn += 1
            if self.turn < len(self.task.turns):
                obs = [{"role": "user", "content": self.task.turns[self.turn]}]
        self.messages.extend(obs)
        self.done = self.turn >= len(self.task.turns) or self.steps >= self.max_steps
        if not self.done:
            return copy.deepcopy(obs), 0.0, False
        verdicts = self.verdicts()
        return copy.deepcopy(obs), sum(v["passed"] for v in verdicts) / len(verdicts), True

    def _call(self, tc: dict) -> dict:
        """Execute one tool call; every outcome (result, bad arguments, injected or real failure) is text."""
        reply, record, args = screen_call(tc, self._validators, self.calls, self.rng, self.fault_rate)
        if args is None:
            return reply
        name = record["name"]
        try:
            result = self.domain.run_tool(self.state, name, args)
        except ToolError as e:
            record["fault"] = "edge_case"
            return reply | {"content": f"error: {e}"}
        record["ok"] = True
        return reply | {"content": result if isinstance(result, str) else json.dumps(result, sort_keys=True)}

    def verdicts(self) -> list[dict]:
        """The rubric's checkpoints, each {checkpoint, passed, explanation}, graded on the episode so far."""
        out = []
        for cp in self.task.rubric["checkpoints"]:
            if cp["kind"] == "tools":
                used = [c["name"] for c in self.calls if c["ok"]]
                it = iter(used)
                ok = all(name in it for name in cp["sequence"])  # expected pattern is a subsequence of the calls
                why = f"called {cp['sequence']} in order" if ok else f"expected calls {cp['sequence']}, made {used}"
            elif cp["kind"] == "call":  # one successful call with these argument values (others may be there too)
                want = cp["arguments"]
                ok = any(c["name"] == cp["name"] and c["ok"] and c["args"].items() >= want.items() for c in self.calls)
                made = [(c["name"], c.get("args", c["arguments"])) for c in self.calls]
                why = f"called {cp['name']} with {want}" if ok else f"never called {cp['name']} with {want} ({made})"
            elif cp["kind"] == "state":
                ok, why = self.domain.check_state(self.state, cp)
            elif cp["turn"] >= len(self.answers):
                ok, why = False, f"turn {cp['turn'] + 1} was never answered"
            else:
                ok, why = self.domain.check_answer(self.state, cp, self.answers[cp["turn"]])
            out.append({"checkpoint": cp["id"], "passed": bool(ok), "explanation": why})
        return out

    def close(self) -> None:
        if self.state is not None:
            self.domain.close(self.state)
            self.state = None


def screen_call(tc: dict, validators: dict, calls: list, rng, fault_rate: float) -> tuple[dict, dict, dict | None]:
    """What every tool simulator does before running a call: log it in `calls`, refuse an unknown tool or
    arguments that break the schema, inject a transient failure at `fault_rate`. Returns (reply, record, args):
    args is None when `reply` (a tool message) already holds the outcome, else the parsed arguments to run."""
    name, raw = tc["function"]["name"], tc["function"]["arguments"]
    record = {"name": name, "arguments": raw, "ok": False}
    calls.append(record)
    reply = {"role": "tool", "tool_call_id": tc["id"]}
    if name not in validators:
        return reply | {"content": f"error: no tool named {name!r}; available: {sorted(validators)}"}, record, None
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
        errors = [e.message for e in validators[name].iter_errors(args)]
    except json.JSONDecodeError as e:
        errors = [f"arguments are not JSON ({e.msg})"]
    if errors:
        record["schema_error"] = "; ".join(errors)
        return reply | {"content": f"error: invalid arguments for {name}: {record['schema_error']}"}, record, None
    record["args"] = args  # parsed and valid: what checkpoints compare (the raw text stays in "arguments")
    if rng.random() < fault_rate:
        record["fault"] = "transient"
        return reply | {"content": f"{TRANSIENT}: the {name} service did not answer in time; try again"}, record, None
    return reply, record, args
