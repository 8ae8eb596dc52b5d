"""Calibration eval end to end against a scripted OpenAI-compatible server.

The server (k2lab.testing.scripted_server) is a real HTTP server on loopback that plays back scripted answers
and judge replies: a test double for the models. The thing under test is the harness: prompts, grade parsing,
retries, storage, resume and the metrics, which must equal the hand-computed values.
"""

import json
import subprocess
import sys

import pytest

from tests.evals_helpers import CalibrationScript, graded_run, rows_for, run_calibration, write_jsonl
from k2lab.evals import calibration
from k2lab.evals.judge import JudgeError
from k2lab.evals.store import DatasetError
from k2lab.runs import RunDirError
from k2lab.testing.scripted_server import ScriptedServer

LETTERS = {"q1": "A", "q2": "A", "q3": "B", "q4": "D", "q5": "C", "q6": "B"}
DOMAIN = {"q1": "x", "q2": "x", "q3": "x", "q4": "x", "q5": "y", "q6": "y"}


def test_metrics_equal_hand_computed_partial_as_incorrect(tmp_path):
    run_dir, r = graded_run(tmp_path, LETTERS, domain_of=DOMAIN.get, partial="incorrect")
    o = r["overall"]
    # 2 correct, 3 incorrect (B, B, C), 1 abstain
    assert (o["total"], o["correct"], o["incorrect"], o["partial_answer"], o["not_attempted"]) == (6, 2, 2, 1, 1)
    assert o["omniscience_index"] == pytest.approx(100 * (2 - 3) / 6)
    assert o["accuracy"] == pytest.approx(2 / 6)
    assert o["hallucination_rate"] == pytest.approx(3 / 4)
    x, y = r["domains"]["x"], r["domains"]["y"]
    assert x["omniscience_index"] == pytest.approx(100 * (2 - 1) / 4)
    assert x["hallucination_rate"] == pytest.approx(1 / 2)
    assert y["omniscience_index"] == pytest.approx(-100.0) and y["accuracy"] == 0.0 and y["hallucination_rate"] == 1.0
    lo, hi = o["omniscience_index_ci95"]
    assert lo <= o["omniscience_index"] <= hi
    assert json.loads((run_dir / "results.json").read_text())["overall"] == o
    report = (run_dir / "report.md").read_text()
    assert "Omniscience" in report or "omniscience_index" in report
    assert (run_dir / "plots" / "domains.png").stat().st_size > 1000
    assert (run_dir / "plots" / "omniscience.png").stat().st_size > 1000


def test_partial_as_abstain(tmp_path):
    _, r = graded_run(tmp_path, LETTERS, partial="abstain")
    o = r["overall"]
    assert o["omniscience_index"] == pytest.approx(0.0)  # 2 correct, 2 incorrect
    assert o["accuracy"] == pytest.approx(2 / 6)
    assert o["hallucination_rate"] == pytest.approx(2 / 4)


def test_all_abstain(tmp_path):
    _, r = graded_run(tmp_path, {f"q{i}": "D" for i in range(4)})
    o = r["overall"]
    assert (o["omniscience_index"], o["accuracy"], o["hallucination_rate"]) == (0.0, 0.0, 0.0)


def test_no_correct_answers(tmp_path):
    _, r = graded_run(tmp_path, {"q1": "B", "q2": "D", "q3": "B", "q4": "C"}, partial="abstain")
    o = r["overall"]
    assert o["accuracy"] == 0.0
    assert o["omniscience_index"] == pytest.approx(-50.0)
    assert o["hallucination_rate"] == pytest.approx(2 / 4)


def test_all_correct_has_no_hallucination_rate(tmp_path):
    _, r = graded_run(tmp_path, {"q1": "A", "q2": "A"})
    assert r["overall"]["hallucination_rate"] is None and r["overall"]["omniscience_index"] == 100.0


def test_judge_reply_without_grade_is_retried_then_ungraded(tmp_path):
    dataset = write_jsonl(tmp_path / "d.jsonl", rows_for({"q1": 0, "q2": 0, "q3": 0}))
    script = CalibrationScript({"j1": {
        "q1": ["It looks right to me.", "Matches the gold.\nA"],  # second attempt names a grade
        "q2": ["Hmm, either A or B.", "I am not sure", "could be anything"],  # never names one
        "q3": "Wrong value.\nB"}})
    with ScriptedServer(script) as srv:
        r = run_calibration(srv, dataset, tmp_path / "run", ["j1"])
    grades = {g["id"]: g for g in map(json.loads, (tmp_path / "run" / "grades.jsonl").read_text().splitlines())}
    assert (grades["q1"]["grade"], grades["q1"]["attempts"]) == ("A", 2)
    assert grades["q2"]["grade"] is None and grades["q2"]["attempts"] == 3 and len(grades["q2"]["replies"]) == 3
    assert script.judged[("j1", "q2")] == 3
    assert r["ungraded"] == [{"id": "q2", "tie": False}]
    assert r["overall"]["total"] == 2 and r["overall"]["omniscience_index"] == 0.0  # q2 never guessed
    assert grades["q3"]["explanation"] == "Wrong value."


def test_resume_does_not_re_ask_answered_items(tmp_path):
    letters = {"q1": "A", "q2": "B", "q3": "D", "q4": "A"}
    dataset = write_jsonl(tmp_path / "d.jsonl", rows_for(letters))
    replies = {"j1": {q: g for q, g in letters.items()}}
    first = CalibrationScript(replies, fail={"q2", "q4"})  # the endpoint fails on two questions
    with ScriptedServer(first) as srv:
        r1 = run_calibration(srv, dataset, tmp_path / "run", ["j1"])
        with pytest.raises(RunDirError, match="resume"):
            run_calibration(srv, dataset, tmp_path / "run", ["j1"])
    assert {u["id"] for u in r1["unanswered"]} == {"q2", "q4"} and r1["overall"]["total"] == 2
    # a crash while writing leaves a torn last line; it must not break the resumed run
    with open(tmp_path / "run" / "answers.jsonl", "a") as f:
        f.write('{"id": "q4", "answ')
    second = CalibrationScript(replies)
    with ScriptedServer(second) as srv:
        r2 = run_calibration(srv, dataset, tmp_path / "run", ["j1"], resume=True)
    assert second.asked == {"q2": 1, "q4": 1}  # q1 and q3 were answered and judged: not asked again
    assert set(second.judged) == {("j1", "q2"), ("j1", "q4")}
    assert r2["overall"]["total"] == 4 and r2["unanswered"] == []
    assert r2["overall"]["omniscience_index"] == pytest.approx(100 * (2 - 1) / 4)


def test_several_judges_vote_and_ties_are_reported(tmp_path):
    j1 = {"q1": "A", "q2": "A", "q3": "B"}
    j2 = {"q1": "A", "q2": "B", "q3": "B"}
    j3 = {"q1": "B", "q2": "A", "q3": "D"}
    _, r = graded_run(tmp_path, j1, judges={"j1": j1, "j2": j2, "j3": j3})
    assert r["overall"]["correct"] == 2 and r["overall"]["incorrect"] == 1  # q1 A (2:1), q2 A (2:1), q3 B (2:1)
    (tmp_path / "tie").mkdir()
    _, r = graded_run(tmp_path / "tie", {"q1": "A"}, judges={"j1": {"q1": "A"}, "j2": {"q1": "B"}})
    assert r["ungraded"] == [{"id": "q1", "tie": True}] and r["overall"]["total"] == 0


def test_malformed_rows_stop_or_skip_with_line_numbers(tmp_path):
    good = {"domain": "d", "topic": "t", "question": "q?", "answer": "a"}
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps({**good, "question": "q2", "answer": ""}),
                               "", json.dumps({**good, "question": "q3", "topic": 7}), json.dumps([1, 2])]) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: not valid JSON"):
        calibration.load_dataset(path, "stop")
    data = calibration.load_dataset(path, "skip")
    assert [r["question"] for r in data.rows] == ["q?"]
    assert [s.split(": ", 1)[0] for s in data.skipped] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert "missing field 'answer'" in data.skipped[1] and "'topic' must be str" in data.skipped[2]
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("domain,topic,question,answer\nd,t,q1,a1\nd,t,,a2\nd,t,q3,a3,extra\n")
    data = calibration.load_dataset(csv_path, "skip")
    assert [r["question"] for r in data.rows] == ["q1"]
    assert [s.split(": ", 1)[0] for s in data.skipped] == [f"{csv_path}:3", f"{csv_path}:4"]
    with pytest.raises(DatasetError, match=r"bad.csv:3: missing field 'question'"):
        calibration.load_dataset(csv_path, "stop")


def test_skipped_rows_are_reported_in_the_run(tmp_path):
    rows = rows_for({"q1": 0})
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n{broken\n")
    with ScriptedServer(CalibrationScript({"j1": {"q1": "A"}})) as srv:
        r = run_calibration(srv, path, tmp_path / "run", ["j1"], on_error="skip")
        assert r["overall"]["total"] == 1 and r["skipped_rows"][0].startswith(f"{path}:2:")
        with pytest.raises(DatasetError, match=":2:"):
            run_calibration(srv, path, tmp_path / "run2", ["j1"])


# run in a fresh interpreter: the checks are about CPython's defaults, and other tests change this process's state
# (torch's inductor raises sys.getrecursionlimit() to 2000 when it compiles, so py-18 failed after the compiled
# decode tests on a cold compile cache)
_CHECK_ROWS = """
import ast, importlib, importlib.util, json, sys
for row in json.load(sys.stdin):
    names = {n.id for n in ast.walk(ast.parse(row["check"], mode="eval")) if isinstance(n, ast.Name)}
    env = {"importlib": importlib}
    for name in names - {"importlib"}:
        try:
            env[name] = importlib.import_module(name)
        except ImportError:  # a local name of the expression, not a module
            pass
    if not eval(row["check"], env):
        print(f"{row['id']}: {row['check']}")
"""


def test_shipped_seed_dataset_facts_hold_in_this_python():
    data = calibration.load_dataset(calibration.SEED_DATASET)
    assert data.skipped == [] and len(data.rows) >= 60
    kinds = {r["kind"] for r in data.rows}
    assert kinds == {"fact", "nonexistent"} and sum(r["kind"] == "nonexistent" for r in data.rows) >= 10
    rows = [r for r in data.rows if "check" in r]
    r = subprocess.run([sys.executable, "-c", _CHECK_ROWS], input=json.dumps(rows), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "", f"gold answers that do not hold here:\n{r.stdout}"


def test_a_judge_whose_context_is_too_short_stops_the_run_with_a_clear_error(tmp_path):
    """The scripted endpoint refuses the judge's prompt the way k2lab's server and vLLM do (HTTP 400, "maximum
    context length"); the run stops at the first grade, before the other items are sent, instead of logging the
    same error for every item."""
    dataset = write_jsonl(tmp_path / "d.jsonl", rows_for({"q1": "A", "q2": "B"}))
    answers = CalibrationScript({})

    def reply(req):
        if req.system.startswith("You are answering a question"):
            return answers(req)
        raise RuntimeError("This model's maximum context length is 256 tokens; the prompt has 700 tokens.")

    with ScriptedServer(reply) as srv:
        with pytest.raises(JudgeError, match="judge j1: the grading prompt .* does not fit"):
            run_calibration(srv, dataset, tmp_path / "run", ["j1"])
    assert not (tmp_path / "run" / "errors.jsonl").exists()
    assert answers.asked == {"q1": 1}  # the first item alone, then the stop; its answer is kept for --resume
    assert len((tmp_path / "run" / "answers.jsonl").read_text().splitlines()) == 1
