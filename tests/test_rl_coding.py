"""The coding environment: tasks are deterministic, the reward is the share of unit tests passing, every test runs
in the agents' sandbox (never in this process), and adversarial answers earn nothing they did not pass."""

import asyncio
import sys
import time

import pytest

from k2lab.synth.domains import make_tasks, registry
from k2lab.synth.domains.coding import PROBLEMS, Coding
from k2lab.synth.env import Environment, Task

DOMAIN = registry()["coding"]


def task(fn: str) -> Task:
    name, prompt, tests, solution = next(p for p in PROBLEMS if p[0] == fn)
    cps = [{"id": f"test_{i}", "kind": "unit_test", "turn": 0, "index": i, "test": t} for i, t in enumerate(tests)]
    rubric = {"success_criteria": [], "expected_tools": [], "checkpoints": cps}
    return Task(f"t-{fn}", "coding", Coding.system, [prompt], rubric, {"function": fn, "solution": solution})


def play(t: Task, answer: str) -> tuple[float, list[dict]]:
    env = Environment(DOMAIN, t)
    env.reset()
    try:
        _, reward, done = env.step({"role": "assistant", "content": answer})
        assert done
        return reward, env.verdicts()
    finally:
        env.close()


def test_tasks_are_deterministic_and_the_reference_solutions_pass_every_test():
    a = [t.as_dict() for t in make_tasks(["coding"], 40, seed=3)]
    assert a == [t.as_dict() for t in make_tasks(["coding"], 40, seed=3)]
    assert a != [t.as_dict() for t in make_tasks(["coding"], 40, seed=4)]
    assert len({t["world"]["function"] for t in a}) >= 15
    for t in make_tasks(["coding"], 12, seed=3):  # the solver's answer (the reference solution) passes
        reward, verdicts = play(t, DOMAIN.plan(t, 0, []))
        assert reward == 1.0 and all(v["passed"] for v in verdicts) and len(verdicts) >= 3


FACTORIAL_PARTIAL = "```python\ndef factorial(n):\n    return 1 if n < 2 else n * (n - 1)\n```"  # right for 0, 1


@pytest.mark.parametrize("answer, reward", [
    ("```python\ndef factorial(n):\n    import math\n    return math.factorial(n)\n```", 1.0),
    ("def factorial(n):\n    r = 1\n    for i in range(2, n + 1):\n        r *= i\n    return r", 1.0),  # no fence
    (FACTORIAL_PARTIAL, 0.5),  # 2 of 4 tests: the reward is the share passing
    ("```python\ndef factorial(n):\n    return 0\n```", 0.0),  # wrong
    ("", 0.0),  # empty
    ("```python\n```", 0.0),  # format only
    ("```python\nprint('tests-passed')\nprint('passed')\n```", 0.0),  # prints what a passing run prints
    ("```python\ndef factorial(n):\n    raise RuntimeError('no')\n```", 0.0),  # raises
    ("```python\nimport sys\ndef factorial(n):\n    return 0\nsys.exit(0)\n```", 0.0),  # exits before the tests
    ("```python\nimport os\nos._exit(0)\n```", 0.0),
    ("```python\nimport builtins\nbuiltins.AssertionError = None\ndef factorial(n):\n    return 0\n```", 0.0),
    ("```python\nclass Any:\n    pass\ndef factorial(n):\n    return Any()\n```", 0.0),
])
def test_reward_is_the_share_of_tests_passing_and_resists_adversarial_answers(answer, reward):
    got, verdicts = play(task("factorial"), answer)
    assert got == reward and len(verdicts) == 4


def test_an_infinite_loop_times_out_and_earns_nothing():
    t0 = time.perf_counter()
    reward, verdicts = play(task("is_even"), "```python\ndef is_even(n):\n    while True:\n        pass\n```")
    assert reward == 0.0 and time.perf_counter() - t0 < 30
    assert all("fails" in v["explanation"] for v in verdicts)
    assert {v["explanation"].rsplit("(", 1)[1] for v in verdicts} <= {"timeout)", "killed)"}


def test_the_code_never_runs_in_this_process():
    reward, _ = play(task("add"), "```python\nimport sys\nsys.k2lab_ran = 1\ndef add(a, b):\n    return a + b\n```")
    assert reward == 1.0 and not hasattr(sys, "k2lab_ran")  # it ran, elsewhere


def test_the_environment_works_when_called_from_a_running_event_loop():
    async def inside():
        return play(task("add"), "```python\ndef add(a, b):\n    return a + b\n```")[0]
    assert asyncio.run(inside()) == 1.0


def test_each_distinct_answer_runs_once_per_episode():
    env = Environment(DOMAIN, task("add"))
    env.reset()
    env.step({"role": "assistant", "content": "def add(a, b):\n    return a + b"})
    env.verdicts()
    env.verdicts()
    assert len(env.state["results"]) == 1
    env.close()
