"""The filter against the shipped hand-labelled set, and human review of judged trajectories (session, terminal,
web page over HTTP, a real browser when chromium is installed). Judged runs come from the scripted
OpenAI-compatible server (a test double for the models; k2lab/testing/synth_script.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import urllib.parse
import urllib.request

import pytest

from k2lab.evals.stats import cohen_kappa
from k2lab.runs import read_json, read_jsonl
from k2lab.synth.filter import LABELLED, measure
from k2lab.synth.review import ReviewSession, make_server, review_tui
from k2lab.synth.stages import main
from k2lab.testing.scripted_server import ScriptedServer
from k2lab.testing.synth_script import CASES, handler


def test_filter_against_the_hand_labelled_set():
    items = read_jsonl(LABELLED)
    assert len(items) >= 40 and all(i["reason"] for i in items)
    r = measure()
    assert r["good"] >= 20 and r["bad"] >= 20
    c = r["confusion"]
    assert r["precision"] == round(c["accepted_good"] / (c["accepted_good"] + c["accepted_bad"]), 4)
    assert r["recall"] == round(c["accepted_good"] / (c["accepted_good"] + c["rejected_good"]), 4)
    assert r["precision"] >= 0.9 and r["recall"] >= 0.9  # regression bar at the measured values (0.92 / 0.958)
    assert len(r["mistakes"]) == c["accepted_bad"] + c["rejected_good"]


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "run"
    with ScriptedServer(handler) as srv:
        main(out, srv.base_url, "k", "scripted", ["judge-a", "judge-b"], [], [], ["travel"], len(CASES), 4, 0.0, 0,
             False, backoff=(0.01, 0.05))
    return out


def copy_run(judged, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(judged, dst)
    return dst


def test_reviews_override_the_judges_and_rebuild_the_dataset(judged, tmp_path):
    out = copy_run(judged, tmp_path)
    s = ReviewSession(out, reviewer="tester")
    pending = s.pending()
    assert sorted(p["goal"][1:].split("]")[0] for p in pending) == ["split", "split", "unsure", "unsure"]
    kept = read_jsonl(out / "kept.jsonl")
    judged_reject = [i for i in s.items() if i["judge_decision"] == "reject"]
    s.review(pending[0]["task_id"], "accept", "meets the rubric on reading")
    s.review(pending[1]["task_id"], "reject", "the answer is vague")
    s.review(kept[0]["task_id"], "reject", "spot check: not convincing")  # overrides the judges
    s.review(kept[1]["task_id"], "accept")
    s.review(judged_reject[0]["task_id"], "reject")
    with pytest.raises(ValueError, match="verdict"):
        s.review(kept[1]["task_id"], "maybe")
    with pytest.raises(KeyError):
        s.review("nope", "accept")
    data = {r["task_id"] for r in read_jsonl(out / "dataset.jsonl")}
    assert data == {r["task_id"] for r in kept} - {kept[0]["task_id"]} | {pending[0]["task_id"]}
    stats = read_json(out / "review.json")
    pairs = [("accept", "reject"), ("accept", "accept"), ("reject", "reject")]
    assert stats["cohen_kappa"] == round(cohen_kappa(*zip(*pairs)), 4) and stats["unsure_resolved"] == 2
    assert [d["task_id"] for d in stats["disagreements"]] == [kept[0]["task_id"]]
    assert read_json(out / "card.json")["review"]["cohen_kappa"] == stats["cohen_kappa"]


def test_terminal_review(judged, tmp_path):
    out = copy_run(judged, tmp_path)
    answers = iter(["a", "fine", "s", "r", "too vague", "q"])
    shown = []
    n = review_tui(ReviewSession(out), ask=lambda _: next(answers), show=shown.append)
    assert n == 2 and "Judges:" in shown[0] and "ASSISTANT CALLS" in shown[0]
    assert [r["verdict"] for r in read_jsonl(out / "reviews.jsonl")] == ["accept", "reject"]
    r = subprocess.run([sys.executable, "-m", "k2lab.cli", "review", str(out)], input="q\n", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "[a]ccept" in r.stdout


@pytest.fixture
def served(judged, tmp_path):
    out = copy_run(judged, tmp_path)
    server = make_server(ReviewSession(out, reviewer="web"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield out, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_web_review_over_http(served):
    out, url = served
    page = urllib.request.urlopen(url).read().decode()
    pending = ReviewSession(out).pending()
    assert all(p["task_id"] in page for p in pending) and "pending 4" in page
    body = urllib.parse.urlencode({"task_id": pending[0]["task_id"], "verdict": "accept", "reason": "ok"}).encode()
    urllib.request.urlopen(urllib.request.Request(url + "review", data=body))  # follows the 303 back to the page
    assert read_jsonl(out / "reviews.jsonl")[-1] | {} == {"task_id": pending[0]["task_id"], "verdict": "accept",
                                                          "reason": "ok", "reviewer": "web"}
    bad = urllib.parse.urlencode({"task_id": "nope", "verdict": "accept"}).encode()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url + "review", data=bad))
    assert e.value.code == 400


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install -y chromium")
def test_web_review_in_a_browser(served):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    out, url = served
    target = ReviewSession(out).pending()[0]["task_id"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url)
        section = page.locator(f"section[id='item-{target}']")
        section.locator("input[name=reason]").fill("clicked in a browser")
        section.locator("button.reject").click()
        page.wait_for_load_state()
        assert "rejected by web" in page.locator(f"section[id='item-{target}'] .status").inner_text()
        browser.close()
    assert json.loads((out / "reviews.jsonl").read_text().splitlines()[-1])["reason"] == "clicked in a browser"
