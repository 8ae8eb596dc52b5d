"""Rewards for RL, composed per environment from small pure functions with known-case and adversarial tests.

- `verifiable`: exact, normalized (the calibration grader's rules) or numeric-with-tolerance answers -> 1 / 0.
- `unit_tests`: a coding answer's last code block runs against the task's tests in the sandbox (the coding
  eval's runner, which also catches programs that exit early) -> 1 / 0.
- `tool_use`: the calls an episode made against a rubric given as data (required calls with required
  arguments, forbidden tools, a call budget, optional order) -> the share of required calls made, 0 on a
  violation.
- `calibration`: correct +1, wrong -1, abstained 0 (configurable; saying nothing is not abstaining); `brier`:
  1 - (confidence - correct)^2 on a stated confidence ("Confidence: 0.8", which `CONFIDENCE_INSTRUCTION` asks
  for), a fixed value for abstaining, 0 when the confidence is missing or ambiguous.
- `budget`: over-budget responses are truncated (`truncate_to_budget`) and get -penalty.
- `compose`: a weighted sum with every component recorded; `temperature`: the sampling temperature schedule.
Reward functions read the final answer (assistant content, reasoning excluded); the grader is
`k2lab.evals.rules`, so RL rewards and the offline calibration eval grade alike.
"""

from __future__ import annotations

import json
import math
import re

from k2lab.evals import rules
from k2lab.train.rl.trajectory import Trajectory

VERIFIABLE_MODES = ("exact", "normalized", "numeric")


def verifiable(answer: str | None, gold: str, mode: str = "normalized", rel_tol: float = 1e-6) -> float:
    """1.0 when the answer states the gold, else 0.0 (abstaining earns nothing here)."""
    if mode not in VERIFIABLE_MODES:
        raise ValueError(f"verifiable: mode must be one of {VERIFIABLE_MODES}, got {mode!r}")
    if mode == "exact":
        return float((answer or "").strip() == gold.strip() and bool(gold.strip()))
    if mode == "numeric" and rules.as_number(gold) is None:
        raise ValueError(f"verifiable: numeric mode needs a numeric gold, got {gold!r}")
    return float(rules.grade(answer, gold, rel_tol if mode == "numeric" else 0.0) == "A")


async def unit_tests(sandbox, answer: str | None, tests: str, limits=None) -> float:
    """1.0 when the answer's code passes `tests` in `sandbox` (a k2lab.agents.sandbox.Sandbox), else 0.0."""
    from k2lab.agents.sandbox import Limits
    from k2lab.evals.coding import extract_code, run_tests

    code = extract_code(answer or "")
    if not code:
        return 0.0
    result = await run_tests(sandbox, code, tests, limits or Limits(cpu_s=10, wall_s=20, memory_mb=1024))
    return float(result["passed"])


def _call(call: dict) -> tuple[str, object]:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = None  # unparseable arguments match no required call
    return fn.get("name", ""), args


def _satisfies(args: object, required: dict) -> bool:
    return isinstance(args, dict) and all(k in args and args[k] == v for k, v in required.items())


def tool_use(calls: list[dict], rubric: dict) -> float:
    """Score OpenAI-style tool calls against a rubric:
    {"required": [{"name", "arguments": {subset that must match}}], "forbidden": [names], "max_calls": int,
     "ordered": bool}. A forbidden tool or more than max_calls calls scores 0; otherwise the share of required
    calls matched (each by a distinct call, in order when `ordered`)."""
    required, forbidden = rubric.get("required", []), set(rubric.get("forbidden", []))
    if not required:
        raise ValueError("tool_use: the rubric needs at least one required call")
    made = [_call(c) for c in calls]
    if len(made) > rubric.get("max_calls", 2 * len(required)) or any(name in forbidden for name, _ in made):
        return 0.0
    used, matched, start = set(), 0, 0
    for req in required:
        for i in range(start, len(made)):
            if i not in used and made[i][0] == req["name"] and _satisfies(made[i][1], req.get("arguments", {})):
                used.add(i)
                matched += 1
                start = i + 1 if rubric.get("ordered") else 0
                break
    return matched / len(required)


def calibration(answer: str | None, gold: str, correct: float = 1.0, wrong: float = -1.0,
                abstained: float = 0.0) -> float:
    """Reward an answer by its grade: correct, wrong, or abstained (the values are configurable). An answer
    that commits to nothing without saying it does not know (empty, format only, reasoning cut off) earns
    `wrong`: paid like an abstention, silence would be as good as "I don't know" and RL could learn it."""
    letter = rules.grade(answer, gold)
    if letter == "D" and not rules.declines(answer):
        return wrong
    return {"A": correct, "B": wrong, "D": abstained}[letter]


_CONFIDENCE = re.compile(r"confidence\s*[:=]?\s*(\d+(?:\.\d+)?)\s*(%?)", re.IGNORECASE)
# what a prompt adds so the answer states the confidence `brier` reads
CONFIDENCE_INSTRUCTION = ("\nEnd an answer with how likely it is to be right, as \"Confidence: p\" with p from 0 to "
                          "1; state no confidence when you say you do not know.")


def without_confidence(text: str | None) -> str:
    """The answer with its confidence statements removed: what is graded."""
    return _CONFIDENCE.sub(" ", text or "").strip()


def stated_confidence(text: str | None) -> float | None:
    """The one confidence stated as 'Confidence: 0.8' or 'Confidence: 80%'; None if missing, out of [0, 1] or
    stated more than once with different values."""
    found = {float(v) / 100 if pct else float(v) for v, pct in _CONFIDENCE.findall(text or "")}
    if len(found) != 1:
        return None
    c = found.pop()
    return c if 0.0 <= c <= 1.0 else None


def brier(answer: str | None, gold: str, abstained: float = 0.75) -> float:
    """1 - (c - y)^2 with c the stated confidence and y = 1 if correct; `abstained` when the answer declines
    (0.75 is what a confidence of 0.5 earns either way); 0 when no single confidence is stated."""
    text = without_confidence(answer)  # the confidence statement is not part of the answer
    letter = rules.grade(text, gold)
    if letter == "D":
        return abstained if rules.declines(text) else 0.0  # silence is no abstention (see `calibration`)
    c = stated_confidence(answer)
    if c is None:
        return 0.0
    return 1.0 - (c - float(letter == "A")) ** 2


def truncate_to_budget(traj: Trajectory, budget: int) -> tuple[Trajectory, bool]:
    """(the trajectory cut after its first `budget` sampled tokens, whether it was over budget). The cut keeps
    the environment tokens before that point and marks the finish reason 'length'."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    if traj.sampled_tokens <= budget:
        return traj, False
    seen, end = 0, 0
    for end, m in enumerate(traj.loss_mask, start=1):
        seen += m
        if seen == budget:
            break
    cut = Trajectory(prompt_ids=traj.prompt_ids, policy_version=traj.policy_version,
                     completion_ids=traj.completion_ids[:end], logprobs=traj.logprobs[:end],
                     loss_mask=traj.loss_mask[:end], finish_reason="length")
    return cut, True


def budget(over: bool, penalty: float = 1.0) -> float:
    return -penalty if over else 0.0


def compose(components: dict[str, float], weights: dict[str, float] | None = None) -> tuple[float, dict[str, float]]:
    """(weighted sum, the components) with weight 1 for a component not named in `weights`."""
    weights = weights or {}
    unknown = set(weights) - set(components)
    if unknown:
        raise ValueError(f"compose: weights for components that were not computed: {sorted(unknown)}")
    bad = {k: v for k, v in components.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"compose: non-finite reward components {bad}")
    return sum(weights.get(k, 1.0) * v for k, v in components.items()), dict(components)


def temperature(step: int, total_steps: int, start: float = 1.0, end: float = 0.6) -> float:
    """Sampling temperature decayed from `start` to `end` over training (cosine): explore early, exploit late."""
    if total_steps < 1 or not 0 <= step:
        raise ValueError(f"temperature: need step >= 0 and total_steps >= 1, got {step}, {total_steps}")
    frac = min(step / total_steps, 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * frac))
