"""Shared helpers for the evals tests: a scripted endpoint that plays both the answering model and the judges.

The endpoint is `k2lab.testing.scripted_server.ScriptedServer`, a real OpenAI-compatible HTTP server on
loopback that plays back scripted replies: a test double for the model, not the thing under test.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from k2lab.agents.llm import LLM
from k2lab.evals import calibration
from k2lab.evals.judge import RETRY_NOTE, Judge
from k2lab.testing.scripted_server import ScriptedRequest, ScriptedServer

_QUESTION = re.compile(r"^Question: (.*)$", re.MULTILINE)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_for(grades: dict[str, str], domain_of=lambda q: "d1") -> list[dict]:
    """Dataset rows, one per question, gold answer 'gold <q>'."""
    return [{"id": q, "domain": domain_of(q), "topic": "t", "question": q, "answer": f"gold {q}"} for q in grades]


class CalibrationScript:
    """Answers 'answer to <q>' (or `answers[q]`); judge `model` replies from `replies[model][q]`.

    A reply entry is a string, or a list of strings played one per attempt of that judge on that question.
    `asked` counts answer requests per question; `fail` makes the answer request for those questions fail (400).
    """

    def __init__(self, replies: dict[str, dict[str, str | list[str]]], answers: dict[str, str] | None = None,
                 fail: set[str] = frozenset()):
        self.replies, self.answers, self.fail = replies, answers or {}, set(fail)
        self.asked: dict[str, int] = {}
        self.judged: dict[tuple[str, str], int] = {}

    def __call__(self, req: ScriptedRequest) -> dict:
        if req.system.startswith("You are answering a question"):
            q = req.user
            self.asked[q] = self.asked.get(q, 0) + 1
            if q in self.fail:
                raise RuntimeError(f"scripted failure for {q}")
            return {"content": self.answers.get(q, f"answer to {q}")}
        q = _QUESTION.search(req.user).group(1)
        model = req.body["model"]
        attempt = self.judged.get((model, q), 0)
        self.judged[(model, q)] = attempt + 1
        assert (RETRY_NOTE in req.user) == (attempt > 0)  # retries, and only retries, carry the note
        reply = self.replies[model][q]
        if isinstance(reply, list):
            reply = reply[min(attempt, len(reply) - 1)]
        return {"content": reply}


def run_closing(coro, *llms: LLM):
    """asyncio.run(coro), closing the clients' connections in the same event loop afterwards."""
    async def go():
        try:
            return await coro
        finally:
            for llm in llms:
                await llm.aclose()
    return asyncio.run(go())


def run_calibration(srv: ScriptedServer, dataset: Path, run_dir: Path, judges: list[str], **kw) -> dict:
    model = LLM(base_url=srv.base_url, api_key="test", model="answerer", max_retries=0)
    js = [Judge(LLM(base_url=srv.base_url, api_key="test", model=j, max_retries=0)) for j in judges]
    settings = calibration.CalibrationSettings(dataset=str(dataset), run_dir=str(run_dir), **kw)
    return run_closing(calibration.run_calibration(model, js, settings), model, *[j.llm for j in js])


def graded_run(tmp_path: Path, letters: dict[str, str], judges: dict[str, dict[str, str]] | None = None,
               domain_of=lambda q: "d1", **kw) -> tuple[Path, dict]:
    """A finished calibration run where judge 'j1' replies `letters[q]` (or `judges` gives several)."""
    judges = judges or {"j1": letters}
    dataset = write_jsonl(tmp_path / "data.jsonl", rows_for(letters, domain_of))
    run_dir = tmp_path / "run"
    script = CalibrationScript({j: {q: f"Because.\n{g}" for q, g in gs.items()} for j, gs in judges.items()})
    with ScriptedServer(script) as srv:
        results = run_calibration(srv, dataset, run_dir, list(judges), **kw)
    return run_dir, results


DEMO = [  # seed-dataset questions with plausible scripted answers and judge replies, for the review demos
    ("py-03", "128", "The answer equals the gold value 128.\nA"),
    ("py-04", "4", "The gold is 5; 4 is a different value.\nB"),
    ("nx-01", "The default overlap is 1.", "The gold says chunked_window does not exist; the answer describes it.\nB"),
    ("nx-12", "I'm not aware of a re.FUZZY flag; I don't know.", "The answer declines to commit.\nD"),
    ("py-37", "b'aGk'", "Missing the '=' padding, so the bytes differ from the gold.\nB"),
]


def demo_run(tmp_path: Path) -> Path:
    """A small graded calibration run over seed questions, for the review UI tests and screenshots."""
    seed = {r["id"]: r for r in calibration.load_dataset(calibration.SEED_DATASET).rows}
    rows = [{k: seed[i][k] for k in ("id", "domain", "topic", "question", "answer", "kind")} for i, _, _ in DEMO]
    dataset = write_jsonl(tmp_path / "demo.jsonl", rows)
    q = {seed[i]["question"]: (a, g) for i, a, g in DEMO}
    script = CalibrationScript({"judge-a": {k: g for k, (_, g) in q.items()}},
                               answers={k: a for k, (a, _) in q.items()})
    with ScriptedServer(script) as srv:
        run_calibration(srv, dataset, tmp_path / "demo-run", ["judge-a"])
    return tmp_path / "demo-run"
