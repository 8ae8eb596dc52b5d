"""Human review: the programmatic session and the terminal UI over a calibration run.

The run comes from the scripted OpenAI-compatible server (a real HTTP server on loopback playing back judge
grades; a test double for the models). Under test: append-only overrules, recomputed metrics, agreement.
"""

import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from tests.evals_helpers import demo_run, graded_run
from k2lab.evals.review import ReviewSession, render_item, review_tui
from k2lab.runs import read_jsonl

LETTERS = {"q1": "A", "q2": "B", "q3": "D", "q4": "C", "q5": "A", "q6": "B"}


@pytest.fixture
def run_dir(tmp_path):
    return graded_run(tmp_path, LETTERS, partial="incorrect")[0]


def test_overrules_are_stored_beside_grades_and_metrics_recomputed(run_dir):
    grades_before = (run_dir / "grades.jsonl").read_bytes()
    s = ReviewSession(run_dir, reviewer="ana")
    s.accept("q1")
    s.overrule("q2", "A", "the gold allows this spelling")
    s.accept("q3", "abstained, right")
    s.overrule("q4", "INCORRECT", "the part given is wrong")
    r = json.loads((run_dir / "results.json").read_text())
    # final grades A A D B A B: 3 correct, 2 incorrect, 1 abstain
    o = r["overall"]
    assert (o["correct"], o["incorrect"], o["not_attempted"]) == (3, 2, 1)
    assert o["omniscience_index"] == pytest.approx(100 * (3 - 2) / 6)
    assert o["hallucination_rate"] == pytest.approx(2 / 3)
    assert (r["reviewed"], r["overruled"]) == (4, 2)
    ag = r["agreement"]
    # judge A B D C vs human A A D B: p_o = 1/2, p_e = (1*2 + 1*1 + 1*1 + 1*0) / 16 = 1/4, kappa = 1/3
    assert ag["cohen_kappa"] == pytest.approx(1 / 3)
    assert ag["confusion_judge_rows_human_cols"] == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    assert [(d["id"], d["judge"], d["human"]) for d in ag["disagreements"]] == [("q2", "B", "A"), ("q4", "C", "B")]
    assert "krippendorff_alpha" not in ag  # two raters only
    assert "Disagreements" in (run_dir / "report.md").read_text()

    s.overrule("q2", "B", "changed my mind")  # the latest review wins; earlier ones stay
    reviews = read_jsonl(run_dir / "reviews.jsonl")
    assert [(x["id"], x["action"], x["grade"], x["judge_grade"]) for x in reviews] == [
        ("q1", "accept", "A", "A"), ("q2", "overrule", "A", "B"), ("q3", "accept", "D", "D"),
        ("q4", "overrule", "B", "C"), ("q2", "overrule", "B", "B")]
    assert all(x["reviewer"] == "ana" and x["reason"] for x in reviews)
    assert (run_dir / "grades.jsonl").read_bytes() == grades_before  # judge grades untouched
    assert s.item("q2")["grade"] == "B" and s.item("q2")["judge_grade"] == "B"
    assert {i["id"] for i in s.pending()} == {"q5", "q6"}


def test_review_rejects_bad_input(run_dir):
    s = ReviewSession(run_dir)
    with pytest.raises(ValueError, match="needs a reason"):
        s.overrule("q1", "B", "  ")
    with pytest.raises(ValueError, match="grade must be one of"):
        s.overrule("q1", "E", "no such grade")
    with pytest.raises(KeyError, match="no graded item 'nope'"):
        s.accept("nope")
    assert read_jsonl(run_dir / "reviews.jsonl") == []
    with pytest.raises(FileNotFoundError, match="grades.jsonl"):
        ReviewSession(run_dir.parent)


def test_ungraded_items_can_only_be_overruled(tmp_path):
    run_dir, r = graded_run(tmp_path, {"q1": "A"}, judges={"j1": {"q1": "A"}, "j2": {"q1": "B"}})
    assert r["ungraded"] == [{"id": "q1", "tie": True}]
    s = ReviewSession(run_dir)
    with pytest.raises(ValueError, match="no judge grade to accept"):
        s.accept("q1")
    s.overrule("q1", "A", "settling the tie")
    r = json.loads((run_dir / "results.json").read_text())
    assert r["overall"]["correct"] == 1 and r["ungraded"] == []
    assert r["agreement"]["krippendorff_alpha"] is not None  # j1, j2 and the human: three raters
    assert r["agreement"]["alpha_raters"] == ["j1", "j2", "reviewer:human"]


def test_krippendorff_alpha_over_judges_and_human(tmp_path):
    j1 = {"q1": "A", "q2": "B", "q3": "D", "q4": "A"}
    run_dir, _ = graded_run(tmp_path, j1, judges={"j1": j1, "j2": j1})
    s = ReviewSession(run_dir)
    for q in j1:
        s.accept(q)
    r = json.loads((run_dir / "results.json").read_text())
    assert r["agreement"]["krippendorff_alpha"] == pytest.approx(1.0)
    assert r["agreement"]["cohen_kappa"] == pytest.approx(1.0)
    # a second reviewer disagrees on q2: each reviewer is a rater of their own; the final grade is the latest
    ReviewSession(run_dir, reviewer="bo").overrule("q2", "A", "the spelling is tolerated")
    ag = json.loads((run_dir / "results.json").read_text())["agreement"]
    assert ag["alpha_raters"] == ["j1", "j2", "reviewer:bo", "reviewer:human"]
    # bo rated only q2. q1, q3, q4: 3 equal values each (o_AA = 3 + 3, o_DD = 3); q2: B B A B gives o_BB = 2,
    # o_AB = o_BA = 1. n_A = 7, n_B = 3, n_D = 3, n = 13; D_o = 2/13; D_e = 2 (7*3 + 7*3 + 3*3) / (13*12);
    # alpha = 1 - D_o / D_e = 1 - 24/102 = 13/17
    assert ag["krippendorff_alpha"] == pytest.approx(13 / 17)


def test_terminal_ui_through_its_programmatic_interface(run_dir):
    answers = iter(["a", "",                        # q1: accept
                    "o", "Z", "r",                   # q2: bad grade, shown, asked again
                    "o", "A", "",                    # no reason, shown, asked again
                    "o", "A", "spelling is tolerated",
                    "x", "s",                        # q3: unknown key, then skip
                    "q"])                            # quit at q4
    prompts = []

    def ask(prompt):
        prompts.append(prompt)
        return next(answers)

    console = Console(record=True, width=110, file=io.StringIO())
    done = review_tui(ReviewSession(run_dir), ask=ask, console=console)
    assert done == 2
    reviews = read_jsonl(run_dir / "reviews.jsonl")
    assert [(x["id"], x["action"], x["grade"], x["reason"]) for x in reviews] == [
        ("q1", "accept", "A", "accepted"), ("q2", "overrule", "A", "spelling is tolerated")]
    text = console.export_text()
    assert "grade must be one of" in text and "needs a reason" in text and "unknown choice 'x'" in text
    assert "gold q1" in text and "answer to q1" in text and "Because." in text


def test_terminal_ui_screenshot(tmp_path):
    """Renders the terminal UI's item view of the demo run; saved as SVG when K2LAB_SCREENSHOTS is set."""
    session = ReviewSession(demo_run(tmp_path))
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(render_item(session.item("nx-01"), 3, 5))
    console.print("[a]ccept  [o]verrule  [s]kip  [q]uit > a", markup=False)
    console.print("reason (optional) > invented default for a function that does not exist", markup=False)
    assert "chunked_window" in console.export_text(clear=False)
    if shots := os.environ.get("K2LAB_SCREENSHOTS"):  # K2LAB_SCREENSHOTS=docs/img pytest tests/test_review*.py
        Path(shots).mkdir(parents=True, exist_ok=True)
        console.save_svg(str(Path(shots) / "review_tui.svg"), title="k2lab review runs/demo")


def test_web_page_over_http(run_dir):
    """The page's HTTP interface without a browser (the browser test is tests/test_review_web.py)."""
    import threading
    import urllib.error
    import urllib.parse
    import urllib.request

    from k2lab.evals.review import make_server

    server = make_server(ReviewSession(run_dir))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        body = urllib.parse.urlencode({"id": "q2", "action": "overrule", "grade": "A", "reason": "ok"}).encode()
        with urllib.request.urlopen(url + "/review", data=body) as resp:  # follows the 303 back to the page
            assert 'id="item-q2"' in resp.read().decode()
        with urllib.request.urlopen(url + "/?pending=1") as resp:
            page = resp.read().decode()
        assert 'id="item-q1"' in page and 'id="item-q2"' not in page
        bad = urllib.parse.urlencode({"id": "q1", "action": "delete"}).encode()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/review", data=bad)
        assert err.value.code == 400 and "unknown action" in err.value.read().decode()
        with urllib.request.urlopen(url + "/results.json") as resp:
            assert json.loads(resp.read())["overruled"] == 1
    finally:
        server.shutdown()
        server.server_close()
    assert [r["id"] for r in read_jsonl(run_dir / "reviews.jsonl")] == ["q2"]
