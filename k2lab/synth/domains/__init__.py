"""The embedded domains: tool domains whose tools are real Python code, and a knowledge domain for calibration.

A domain holds its tools (OpenAI function specs), makes tasks with programmatic rubrics from a seeded RNG,
builds an episode's state from a task, runs its tools against that state, checks state checkpoints, and plans
the rule-based solver's next step. `Environment` (env.py) plays one task; `make_tasks` deals tasks round-robin
over domains, each from its own seeded RNG, so task i is the same in every run with the same seed.
"""

from __future__ import annotations

import ast
import copy
import math
import operator
import random

from k2lab.synth.env import Task, ToolError, check_answer

# The user simulator's personas: how a request is worded (the content of the request never changes).
PERSONAS = {
    "direct": lambda s: s,
    "polite": lambda s: f"Hello! {s} Thank you very much.",
    "hurried": lambda s: f"quick one: {s[0].lower()}{s[1:]}",
    "careful": lambda s: f"{s} Please double-check before you answer.",
}


def spec(name: str, description: str, properties: dict, required: list[str] | None = None) -> dict:
    """An OpenAI function-tool definition with a strict object schema."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(properties) if required is None else required,
        "additionalProperties": False}}}


CALCULATE = spec("calculate", "Evaluate an arithmetic expression (+ - * / ** %, parentheses, abs, round, sqrt).",
                 {"expression": {"type": "string", "description": "e.g. (3 + 4) * 2.5"}})
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS = {"abs": abs, "round": round, "sqrt": math.sqrt}


def calculate(expression: str) -> dict:
    """The calculator tool: a safe evaluator over the AST (no names, no attribute access)."""
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 100:
                raise ToolError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
            return _FUNCS[node.func.id](*map(ev, node.args))
        raise ToolError(f"unsupported expression element: {ast.dump(node)[:60]}")
    try:
        value = ev(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ZeroDivisionError, ValueError, TypeError) as e:
        raise ToolError(f"cannot evaluate {expression!r}: {e}") from None
    return {"expression": expression, "result": round(value, 6)}


def fmt(x: float) -> str:
    """A number as the solver writes it: at most two decimals, no trailing zeros."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def tolerance(x: float) -> float:
    return max(0.01, abs(x) * 1e-3)


class Domain:
    """Base class: subclasses set name, system, tools and implement make_task, run_tool and plan."""

    name = ""
    system = ""
    tools: list[dict] = []

    def task_tools(self, task: Task) -> list[dict]:
        """The tools an episode of `task` declares (the domain's own, unless its tasks bring theirs)."""
        return self.tools

    def make_task(self, rng: random.Random, task_id: str, index: int) -> Task:
        raise NotImplementedError

    def initial_state(self, task: Task):
        return copy.deepcopy(task.world.get("state", {}))

    def run_tool(self, state, name: str, args: dict):
        raise NotImplementedError

    def plan(self, task: Task, turn: int, results: list[dict]):
        """Tool calls [(name, args)] or the final answer text, from the turn's results so far."""
        raise NotImplementedError

    def check_answer(self, state, cp: dict, answer: str) -> tuple[bool, str]:
        """An answer checkpoint; a domain with answers that need its own machinery (coding: unit tests in the
        sandbox) overrides this."""
        return check_answer(cp, answer)

    def check_state(self, state, cp: dict) -> tuple[bool, str]:
        raise NotImplementedError(f"domain {self.name} has no state checkpoints")

    def close(self, state) -> None:
        pass

    def task(self, rng: random.Random, task_id: str, turns: list[str], rubric: dict, world: dict) -> Task:
        """A Task with a persona drawn from `rng` applied to the first turn."""
        persona = rng.choice(sorted(PERSONAS))
        return Task(task_id, self.name, self.system, [PERSONAS[persona](turns[0])] + turns[1:], rubric, world, persona)


def registry() -> dict[str, Domain]:
    from k2lab.synth.domains import arithmetic, coding, files, knowledge, lookup, mental, store, toolbox

    return {d.name: d for d in (arithmetic.Arithmetic(), store.Store(), files.Files(), lookup.Lookup(),
                                knowledge.Knowledge(), toolbox.Toolbox("train"), toolbox.Toolbox("heldout"),
                                coding.Coding(), mental.Mental())}


# what `k2lab synth --domains embedded` plays; coding and mental are RL environments only, and toolbox_heldout's
# tools are for evaluation only
EMBEDDED = ("arithmetic", "store", "files", "lookup", "knowledge", "toolbox")


def make_tasks(domains: list[str], n: int, seed: int = 0) -> list[Task]:
    """Task i belongs to domains[i % len(domains)] and depends only on (seed, i)."""
    reg = registry()
    unknown = [d for d in domains if d not in reg]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; embedded domains are {list(EMBEDDED)}")
    out = []
    for i in range(n):
        d = reg[domains[i % len(domains)]]
        out.append(d.make_task(random.Random(f"task:{seed}:{i}"), f"{d.name}-{i:05d}", i // len(domains)))
    return out
