"""Verifiable mental arithmetic without tools: one short question ("What is 7 + 5?"), answered with the number.

The answer is checked by the deterministic rules grader (k2lab.evals.rules) against the exact value: every
number the answer states must be the value, so listing candidates ("11 12 13") or restating the question
("7 + 5 = 12") fails, and an abstention is not an answer. Short prompts and answers make it the RLVR
environment a tiny model can learn in minutes (the tool-using `arithmetic` domain needs far longer prompts).
"""

from __future__ import annotations

import random

from k2lab.evals import rules
from k2lab.synth.domains import Domain
from k2lab.synth.env import Task, check_answer

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class Mental(Domain):
    name = "mental"
    system = "Answer with the number only."
    tools: list[dict] = []
    max_operand = 12

    def make_task(self, rng: random.Random, task_id: str, index: int) -> Task:
        op = rng.choice(sorted(OPS))
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        if op == "-" and b > a:  # no negative results
            a, b = b, a
        value = OPS[op](a, b)
        cp = {"id": "answer", "kind": "exact_number", "turn": 0, "number": value}
        rubric = {"success_criteria": [f"answers {value}"], "expected_tools": [], "checkpoints": [cp]}
        return Task(task_id, self.name, self.system, [f"What is {a} {op} {b}?"], rubric,
                    {"a": a, "b": b, "op": op, "value": value})

    def check_answer(self, state, cp: dict, answer: str) -> tuple[bool, str]:
        if cp["kind"] != "exact_number":
            return check_answer(cp, answer)
        ok = rules.grade(answer, str(cp["number"])) == "A"
        return ok, f"states {cp['number']}" if ok else f"expected exactly {cp['number']}, got {answer[:40]!r}"

    def plan(self, task: Task, turn: int, results: list[dict]):
        return str(task.world["value"])
