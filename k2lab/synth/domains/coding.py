"""Coding with unit tests: write one small Python function; the reward is the share of its unit tests passing.

A task is a function-writing prompt (a few dozen fixed problems, and families whose constants come from the
task's RNG); its rubric has one `unit_test` checkpoint per test. The answer's code (the last fenced block, or
the whole reply, as the coding eval reads it) is never run in this process: each test runs as its own program,
solution then test, in the agents' sandbox (k2lab.agents.sandbox: own process, workspace, CPU, memory and
wall-clock limits, no network) through the coding eval's `run_tests`, which passes a program only when it
gets through the test and prints a fresh nonce after it. So printing "passed", exiting early, raising or
looping forever earns nothing for that test, and patching builtins only affects the one test it runs with.
An episode runs each distinct answer's tests once (in parallel) and keeps the results in its state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import shutil
import tempfile
from pathlib import Path

from k2lab.agents.sandbox import Limits, Sandbox
from k2lab.evals.coding import SYSTEM_PROMPT, extract_code, run_tests
from k2lab.synth.domains import Domain
from k2lab.synth.env import Task, check_answer

# (function, prompt, tests, reference solution); each test is one assert program run after the solution
PROBLEMS = [
    ("add", "Write `add(a, b)` that returns the sum of two numbers.",
     ["assert add(2, 3) == 5", "assert add(-4, 4) == 0", "assert add(0.5, 0.25) == 0.75"],
     "def add(a, b):\n    return a + b"),
    ("is_even", "Write `is_even(n)` that returns True when the integer n is even, else False.",
     ["assert is_even(4) is True", "assert is_even(7) is False", "assert is_even(0) is True",
      "assert is_even(-3) is False"],
     "def is_even(n):\n    return n % 2 == 0"),
    ("reverse_string", "Write `reverse_string(s)` that returns the string s reversed.",
     ["assert reverse_string('abc') == 'cba'", "assert reverse_string('') == ''",
      "assert reverse_string('racecar') == 'racecar'"],
     "def reverse_string(s):\n    return s[::-1]"),
    ("factorial", "Write `factorial(n)` that returns n! for an integer n >= 0.",
     ["assert factorial(0) == 1", "assert factorial(1) == 1", "assert factorial(5) == 120",
      "assert factorial(10) == 3628800"],
     "def factorial(n):\n    out = 1\n    for i in range(2, n + 1):\n        out *= i\n    return out"),
    ("fib", "Write `fib(n)` that returns the n-th Fibonacci number, with fib(0) = 0 and fib(1) = 1.",
     ["assert fib(0) == 0", "assert fib(1) == 1", "assert fib(10) == 55", "assert fib(30) == 832040"],
     "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"),
    ("is_palindrome", "Write `is_palindrome(s)` that returns True when the string s reads the same backwards.",
     ["assert is_palindrome('level') is True", "assert is_palindrome('abc') is False",
      "assert is_palindrome('') is True"],
     "def is_palindrome(s):\n    return s == s[::-1]"),
    ("count_vowels", "Write `count_vowels(s)` that returns how many of the characters of s are in 'aeiouAEIOU'.",
     ["assert count_vowels('hello') == 2", "assert count_vowels('xyz') == 0", "assert count_vowels('AEIOU') == 5"],
     "def count_vowels(s):\n    return sum(ch in 'aeiouAEIOU' for ch in s)"),
    ("largest", "Write `largest(xs)` that returns the largest number of a non-empty list.",
     ["assert largest([3, 9, 2]) == 9", "assert largest([-5, -2, -9]) == -2", "assert largest([7]) == 7"],
     "def largest(xs):\n    return max(xs)"),
    ("total", "Write `total(xs)` that returns the sum of a list of numbers (0 for an empty list).",
     ["assert total([1, 2, 3]) == 6", "assert total([]) == 0", "assert total([-1, 1, 10]) == 10"],
     "def total(xs):\n    return sum(xs)"),
    ("squares", "Write `squares(xs)` that returns a list of the squares of the numbers in xs, in order.",
     ["assert squares([1, 2, 3]) == [1, 4, 9]", "assert squares([]) == []", "assert squares([-2]) == [4]"],
     "def squares(xs):\n    return [x * x for x in xs]"),
    ("unique_sorted", "Write `unique_sorted(xs)` that returns the distinct values of xs in ascending order.",
     ["assert unique_sorted([3, 1, 3, 2]) == [1, 2, 3]", "assert unique_sorted([]) == []",
      "assert unique_sorted([5, 5, 5]) == [5]"],
     "def unique_sorted(xs):\n    return sorted(set(xs))"),
    ("word_count", "Write `word_count(s)` that returns the number of whitespace-separated words in s.",
     ["assert word_count('a b c') == 3", "assert word_count('') == 0", "assert word_count('  one   two ') == 2"],
     "def word_count(s):\n    return len(s.split())"),
    ("c_to_f", "Write `c_to_f(c)` that converts degrees Celsius to Fahrenheit (c * 9 / 5 + 32).",
     ["assert c_to_f(0) == 32", "assert c_to_f(100) == 212", "assert abs(c_to_f(-40) + 40) < 1e-9"],
     "def c_to_f(c):\n    return c * 9 / 5 + 32"),
    ("gcd", "Write `gcd(a, b)` that returns the greatest common divisor of two positive integers.",
     ["assert gcd(12, 18) == 6", "assert gcd(7, 13) == 1", "assert gcd(100, 25) == 25"],
     "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a"),
    ("is_prime", "Write `is_prime(n)` that returns True when the integer n is a prime number.",
     ["assert is_prime(2) is True", "assert is_prime(1) is False", "assert is_prime(97) is True",
      "assert is_prime(91) is False"],
     "def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
     "        if n % i == 0:\n            return False\n        i += 1\n    return True"),
    ("flatten", "Write `flatten(xss)` that turns a list of lists into one list, in order.",
     ["assert flatten([[1, 2], [3]]) == [1, 2, 3]", "assert flatten([]) == []", "assert flatten([[], [4]]) == [4]"],
     "def flatten(xss):\n    return [x for xs in xss for x in xs]"),
    ("digit_sum", "Write `digit_sum(n)` that returns the sum of the decimal digits of an integer n >= 0.",
     ["assert digit_sum(0) == 0", "assert digit_sum(123) == 6", "assert digit_sum(9999) == 36"],
     "def digit_sum(n):\n    return sum(int(d) for d in str(n))"),
    ("clamp", "Write `clamp(x, lo, hi)` that returns x limited to the range [lo, hi].",
     ["assert clamp(5, 0, 10) == 5", "assert clamp(-3, 0, 10) == 0", "assert clamp(42, 0, 10) == 10"],
     "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))"),
    ("count_char", "Write `count_char(s, c)` that returns how many times the character c occurs in s.",
     ["assert count_char('banana', 'a') == 3", "assert count_char('', 'a') == 0", "assert count_char('xyz', 'a') == 0"],
     "def count_char(s, c):\n    return s.count(c)"),
    ("last_n", "Write `last_n(xs, n)` that returns the last n items of the list xs (all of them if n > len(xs)).",
     ["assert last_n([1, 2, 3, 4], 2) == [3, 4]", "assert last_n([1], 5) == [1]", "assert last_n([1, 2], 0) == []"],
     "def last_n(xs, n):\n    return xs[len(xs) - n:] if n < len(xs) else list(xs)"),
    ("running_sum", "Write `running_sum(xs)` that returns the list of prefix sums of xs.",
     ["assert running_sum([1, 2, 3]) == [1, 3, 6]", "assert running_sum([]) == []", "assert running_sum([5]) == [5]"],
     "def running_sum(xs):\n    out, acc = [], 0\n    for x in xs:\n        acc += x\n        out.append(acc)\n"
     "    return out"),
    ("fizzbuzz", "Write `fizzbuzz(n)` returning 'FizzBuzz' if n is divisible by 15, 'Fizz' by 3, 'Buzz' by 5, "
     "else str(n).",
     ["assert fizzbuzz(15) == 'FizzBuzz'", "assert fizzbuzz(9) == 'Fizz'", "assert fizzbuzz(10) == 'Buzz'",
      "assert fizzbuzz(7) == '7'"],
     "def fizzbuzz(n):\n    if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n        return 'Fizz'\n"
     "    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)"),
    ("mean", "Write `mean(xs)` that returns the arithmetic mean of a non-empty list of numbers.",
     ["assert mean([1, 2, 3]) == 2", "assert mean([5]) == 5", "assert abs(mean([1, 2]) - 1.5) < 1e-9"],
     "def mean(xs):\n    return sum(xs) / len(xs)"),
    ("merge_dicts", "Write `merge_dicts(a, b)` that returns a new dict with the items of a, then b (b wins).",
     ["assert merge_dicts({'x': 1}, {'y': 2}) == {'x': 1, 'y': 2}",
      "assert merge_dicts({'x': 1}, {'x': 3}) == {'x': 3}",
      "a = {'x': 1}\nmerge_dicts(a, {'x': 2})\nassert a == {'x': 1}"],
     "def merge_dicts(a, b):\n    return {**a, **b}"),
]


def family(rng: random.Random) -> tuple[str, str, list[str], str]:
    """A problem whose constants come from the task's RNG (many distinct tasks from one template)."""
    kind = rng.choice(("affine", "repeat", "multiples"))
    if kind == "affine":
        a, b = rng.randint(2, 9), rng.randint(1, 20)
        xs = rng.sample(range(-10, 30), 3)
        return ("affine", f"Write `affine(x)` that returns {a} * x + {b}.",
                [f"assert affine({x}) == {a * x + b}" for x in xs], f"def affine(x):\n    return {a} * x + {b}")
    if kind == "repeat":
        k = rng.randint(2, 5)
        words = rng.sample(["ab", "x", "cat", "no", "k2"], 3)
        return ("repeat", f"Write `repeat(w)` that returns the string w repeated {k} times.",
                [f"assert repeat({w!r}) == {w * k!r}" for w in words], f"def repeat(w):\n    return w * {k}")
    m = rng.randint(2, 7)
    ns = rng.sample(range(1, 40), 3)
    return ("multiples", f"Write `multiples(n)` that returns the list of the first n positive multiples of {m}.",
            [f"assert multiples({n}) == {[m * i for i in range(1, n + 1)]}" for n in ns]
            + ["assert multiples(0) == []"],
            f"def multiples(n):\n    return [{m} * i for i in range(1, n + 1)]")


def _blocking(coro):
    """Run a coroutine to completion from synchronous code, also when the caller runs inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # an async caller (e.g. synthesis with an LLM)
        return pool.submit(asyncio.run, coro).result()


class Coding(Domain):
    name = "coding"
    system = SYSTEM_PROMPT
    tools: list[dict] = []
    limits = Limits(cpu_s=2, wall_s=10, memory_mb=512)  # per test program: a loop forever costs 2 CPU seconds

    def make_task(self, rng: random.Random, task_id: str, index: int) -> Task:
        fn, prompt, tests, solution = family(rng) if rng.random() < 0.3 else rng.choice(PROBLEMS)
        cps = [{"id": f"test_{i}", "kind": "unit_test", "turn": 0, "index": i, "test": t} for i, t in enumerate(tests)]
        rubric = {"success_criteria": [f"`{fn}` passes its {len(tests)} unit tests"], "expected_tools": [],
                  "checkpoints": cps}
        return self.task(rng, task_id, [prompt], rubric, {"function": fn, "solution": solution})

    def initial_state(self, task: Task) -> dict:
        return {"workspace": tempfile.mkdtemp(prefix="k2lab-coding-"), "results": {},
                "tests": [cp["test"] for cp in task.rubric["checkpoints"] if cp["kind"] == "unit_test"]}

    def close(self, state) -> None:
        shutil.rmtree(state["workspace"], ignore_errors=True)

    def test_results(self, state: dict, answer: str) -> list[dict]:
        """run_tests' outcome for each of the task's tests on the answer's code, computed once per distinct code."""
        code, tests = extract_code(answer), state["tests"]
        if code not in state["results"]:
            if not code:
                state["results"][code] = [{"passed": False, "outcome": "no code"} for _ in tests]
            else:
                sandbox = Sandbox(Path(state["workspace"]), self.limits)

                async def all_tests():
                    return await asyncio.gather(*(run_tests(sandbox, code, t, self.limits) for t in tests))
                state["results"][code] = _blocking(all_tests())
        return state["results"][code]

    def check_answer(self, state, cp: dict, answer: str) -> tuple[bool, str]:
        if cp["kind"] != "unit_test":
            return check_answer(cp, answer)
        result = self.test_results(state, answer)[cp["index"]]
        return result["passed"], f"passes `{cp['test']}`" if result["passed"] else \
            f"fails `{cp['test']}` ({result['outcome']})"

    def plan(self, task: Task, turn: int, results: list[dict]):
        return f"```python\n{task.world['solution']}\n```"
