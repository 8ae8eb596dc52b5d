"""Coding eval: samples from a scripted OpenAI-compatible server, run against unit tests in the real sandbox.

The server (k2lab.testing.scripted_server) is a real HTTP server on loopback that plays back scripted
solutions: a test double for the model. The sandbox (k2lab.agents.sandbox) and pass@k are the real thing.
"""

import asyncio
import json
import threading

import pytest

from tests.evals_helpers import run_closing, write_jsonl
from k2lab.agents.llm import LLM
from k2lab.agents.sandbox import Limits, Sandbox
from k2lab.evals import coding
from k2lab.evals.stats import pass_at_k
from k2lab.testing.scripted_server import ScriptedServer

SHIPPED = {r["id"]: r for r in coding.load_dataset(coding.SEED_DATASET).rows}
FAST = Limits(cpu_s=5, wall_s=10, memory_mb=512)


def fenced(code: str) -> str:
    return f"Here is the solution:\n```python\n{code}\n```\n"


class Script:
    """Per problem, a list of replies handed out in arrival order (sample order does not matter for pass@k)."""

    def __init__(self, replies: dict[str, list[str]]):
        self.replies, self.lock, self.served = replies, threading.Lock(), {}
        self.by_prompt = {SHIPPED[i]["prompt"]: i for i in replies}

    def __call__(self, req):
        pid = self.by_prompt[req.user]
        with self.lock:
            k = self.served.get(pid, 0)
            self.served[pid] = k + 1
        return {"content": self.replies[pid][k]}


def run(srv, dataset, run_dir, **kw):
    llm = LLM(base_url=srv.base_url, api_key="test", model="coder", max_retries=0)
    settings = coding.CodingSettings(dataset=str(dataset), run_dir=str(run_dir), limits=FAST, **kw)
    return run_closing(coding.run_coding(llm, settings), llm)


def test_pass_at_k_from_sandboxed_samples(tmp_path):
    right = {i: fenced(SHIPPED[i]["solution"]) for i in ("roman", "balanced", "flatten")}
    replies = {  # correct samples per problem: roman 2/4, balanced 0/4, flatten 4/4
        "roman": [right["roman"], "```python\ndef to_roman(n):\n    return 'I' * n\n```", right["roman"],
                  "I cannot do that."],
        "balanced": ["```python\ndef balanced(s):\n    return True\n```",
                     "```python\ndef balanced(s):\n    while True:\n        pass\n```",  # hangs: killed by limits
                     "```python\nimport os\nos._exit(0)\n```", "```python\ndef balanced(s) return\n```"],
        "flatten": [right["flatten"]] * 4,
    }
    dataset = write_jsonl(tmp_path / "p.jsonl", [SHIPPED[i] for i in replies])
    with ScriptedServer(Script(replies)) as srv:
        r = run(srv, dataset, tmp_path / "run", n=4, ks=(1, 2, 4))
    per = {p["id"]: p for p in r["per_problem"]}
    assert {i: per[i]["c"] for i in per} == {"roman": 2, "balanced": 0, "flatten": 4}
    for k in (1, 2, 4):
        expected = (pass_at_k(4, 2, k) + pass_at_k(4, 0, k) + pass_at_k(4, 4, k)) / 3
        assert r["pass_at_k"][str(k)] == pytest.approx(expected)
    assert per["balanced"]["outcomes"] == {"error": 2, "timeout": 1, "ended_early": 1}
    assert (tmp_path / "run" / "plots" / "pass_at_k.png").exists()


def test_resume_keeps_finished_samples(tmp_path):
    replies = {"primes": [fenced(SHIPPED["primes"]["solution"])] * 3}
    dataset = write_jsonl(tmp_path / "p.jsonl", [SHIPPED["primes"]])
    with ScriptedServer(Script(replies)) as srv:
        run(srv, dataset, tmp_path / "run", n=2, ks=(1,))
    with ScriptedServer(Script(replies)) as srv:
        r = run(srv, dataset, tmp_path / "run", n=2, ks=(1, 2), resume=True)
        assert srv.stats.requests == 0
    assert r["pass_at_k"] == {"1": 1.0, "2": 1.0}
    lines = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["sample"] for x in lines) == [0, 1]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="every k in 1..n"):
        coding.CodingSettings(n=2, ks=(3,))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:1: missing field 'tests'"):
        coding.load_dataset(path)


def test_extract_code():
    assert coding.extract_code("x\n```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2"
    assert coding.extract_code("def f(): pass") == "def f(): pass"


def test_shipped_problems_reference_solutions_pass_and_stubs_fail(tmp_path):
    async def check():
        for pid, row in SHIPPED.items():
            box = Sandbox(tmp_path / pid, FAST)
            good = await coding.run_tests(box, row["solution"], row["tests"], FAST)
            assert good["passed"], (pid, good["stderr"])
            stub = await coding.run_tests(box, "", row["tests"], FAST)
            assert not stub["passed"], pid
    asyncio.run(check())
