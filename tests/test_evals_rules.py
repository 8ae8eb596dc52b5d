"""The deterministic calibration grader: known cases, adversarial answers, `--grader rules` end to end (the
answering model is the scripted OpenAI-compatible server, a test double), and the rules-vs-judge comparison."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from k2lab.cli import app
from k2lab.evals import calibration
from k2lab.evals.rules import abstains, compare_graders, grade, match
from k2lab.evals.stats import cohen_kappa
from k2lab.testing.scripted_server import ScriptedServer
from tests.evals_helpers import CalibrationScript, run_calibration, write_jsonl

NX = "functools.timed_cache does not exist in the Python standard library."


@pytest.mark.parametrize("answer, gold, letter", [
    ("Paris", "Paris", "A"), ("The capital is Paris.", "Paris", "A"), ("**Paris**", "paris", "A"),
    ("It was Grace Hopper, I believe.", "Grace Hopper", "A"), ("`os.makedirs`", "os.makedirs", "A"),
    ("os.mkdirs", "os.makedirs", "B"), ("tempfile.mkdtemp()", "tempfile.mkdtemp", "A"),
    ("3.1416", "3.14", "A"), ("3.1", "3.14", "B"), ("The answer is 1,000.", "1000", "A"), ("1e-9", "1e-09", "A"),
    ("129", "128", "B"), ("London", "Paris", "B"),
    ("It does not exist.", NX, "A"), ("There is no such function.", NX, "A"), ("The default ttl is 60.", NX, "B"),
    ("I don't know.", "Paris", "D"), ("I'm not sure, sorry!", "Paris", "D"), ("I'm not sure it exists.", NX, "D"),
    ("I would need more context to answer.", "42", "D"), ("I do not have that information.", "Paris", "D"),
])
def test_known_cases(answer, gold, letter):
    assert grade(answer, gold) == letter


@pytest.mark.parametrize("answer, gold, letter", [
    ("", "Paris", "D"),  # empty
    ("**Answer:**", "Paris", "D"),  # format only
    ("<think></think>```\n```", "42", "D"),
    ("<think>Maybe Paris?</think>London", "Paris", "B"), ("<think>It is Paris", "Paris", "D"),  # reasoning is no answer
    ("<think>Is it London?</think>Paris", "Paris", "A"),
    ("I don't know, but it's London.", "Paris", "B"),  # an abstention phrase does not shield a wrong answer
    ("Not sure. Probably 41.", "42", "B"),
    ("London or Paris or Rome", "Paris", "B"),  # the gold hidden in a hedge list
    ("London, Paris, Rome", "Paris", "B"), ("Either Paris or Lyon.", "Paris", "B"), ("Paris? London?", "Paris", "B"),
    ("128 or 256", "128", "B"), ("somewhere between 100 and 128", "128", "B"),
    ("It does not exist, or maybe it defaults to 60.", NX, "B"),
])
def test_adversarial_answers(answer, gold, letter):
    assert grade(answer, gold) == letter


def test_repetition_earns_nothing_extra():
    assert grade("London " * 40, "Paris") == "B"
    assert grade("42, 42, 42", "42") == grade("42", "42") == "A"  # the same answer, graded once
    assert not match("Paris " * 3 + "London Berlin Rome Madrid Lisbon Oslo Vienna", "Paris")  # many extras


def test_abstention_detection():
    assert abstains("I really don't know.") and abstains("") and abstains("Unfortunately I cannot answer that.")
    assert not abstains("I don't know for sure, but I think it's 7.") and not abstains("7")


SEED = [("q1", "Paris", "Paris", "A"), ("q2", "42", "41", "B"), ("q3", "Oslo", "I don't know.", "D"),
        ("q4", "Rome", "Rome or Milan", "A"),  # the judge is lenient here; the rules are not
        ("q5", "7", "7", "A"), ("q6", "Bern", "Zurich", "B")]


def seed_dataset(tmp_path):
    rows = [{"id": q, "domain": "d", "topic": "t", "question": q, "answer": gold} for q, gold, _, _ in SEED]
    return write_jsonl(tmp_path / "data.jsonl", rows)


def test_grader_rules_end_to_end_asks_no_judge(tmp_path, monkeypatch):
    script = CalibrationScript({}, answers={q: a for q, _, a, _ in SEED})  # a judge request would raise
    with ScriptedServer(script) as srv:
        monkeypatch.setenv("K2LAB_API_KEY", "test")
        out = CliRunner().invoke(app, ["eval", "calibration", "--dataset", str(seed_dataset(tmp_path)),
                                       "--model", "answerer", "--base-url", srv.base_url, "--grader", "rules",
                                       "--run-dir", str(tmp_path / "run")])
        assert out.exit_code == 0, out.output
        assert srv.stats.requests == len(SEED)  # answers only
    lines = (tmp_path / "run" / "grades.jsonl").read_text().splitlines()
    grades = {g["id"]: g["grade"] for g in map(json.loads, lines)}
    assert grades == {"q1": "A", "q2": "B", "q3": "D", "q4": "B", "q5": "A", "q6": "B"}
    o = json.loads((tmp_path / "run" / "results.json").read_text())["overall"]
    assert (o["correct"], o["incorrect"], o["not_attempted"]) == (2, 3, 1)
    assert o["hallucination_rate"] == pytest.approx(3 / 4)


def test_compare_graders_agreement_and_kappa(tmp_path):
    script = CalibrationScript({"j1": {q: f"Because.\n{letter}" for q, _, _, letter in SEED}},
                               answers={q: a for q, _, a, _ in SEED})
    with ScriptedServer(script) as srv:
        run_calibration(srv, seed_dataset(tmp_path), tmp_path / "run", ["j1"])
    r = compare_graders(calibration.load_items(tmp_path / "run"))
    judge, rules = ["A", "B", "D", "A", "A", "B"], ["A", "B", "D", "B", "A", "B"]
    assert r["items"] == 6 and r["agreement"] == pytest.approx(5 / 6)
    assert r["cohen_kappa"] == pytest.approx(cohen_kappa(judge, rules))
    assert r["cohen_kappa"] == pytest.approx((5 / 6 - (3 * 2 + 2 * 3 + 1 * 1) / 36) / (1 - 13 / 36))
    assert [(d["id"], d["judge"], d["rules"]) for d in r["disagreements"]] == [("q4", "A", "B")]
    assert r["confusion_judge_rows_rules_cols"][0] == [2, 1, 0, 0]
    out = CliRunner().invoke(app, ["eval", "compare-graders", str(tmp_path / "run")])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "run" / "grader_agreement.json").read_text())["agreement"] == pytest.approx(5 / 6)


def test_grader_and_judge_models_must_agree(tmp_path):
    base = dict(model="m", base_url="http://127.0.0.1:9/v1", run_dir=str(tmp_path), concurrency=1)
    with pytest.raises(ValueError, match="--grader rules"):
        calibration.main(calibration.CalibrationSettings(**base))
    with pytest.raises(ValueError, match="drop --judge-model"):
        calibration.main(calibration.CalibrationSettings(judge_models=["j"], grader="rules", **base))
    with pytest.raises(ValueError, match="--grader must be"):
        calibration.CalibrationSettings(grader="vibes", **base)


@given(st.text(max_size=80), st.sampled_from(["Paris", "42", "3.14", "os.makedirs", NX, "Grace Hopper"]))
@settings(max_examples=300, deadline=None)
def test_any_text_gets_a_grade_and_never_a_traceback(answer, gold):
    assert grade(answer, gold) in ("A", "B", "D")
    assert grade(answer + " or " + answer, gold) != "A" or grade(answer, gold) == "A"  # a hedge never helps
