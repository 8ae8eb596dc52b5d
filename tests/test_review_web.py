"""The review web page driven by a headless browser (Debian's chromium through playwright).

The run it reviews comes from the scripted OpenAI-compatible server (a real HTTP server on loopback playing
back answers and judge grades; a test double for the models). Under test: the page, the clicks and what they
store. Needs `apt-get install chromium`; skipped with that reason when it is absent.
`K2LAB_SCREENSHOTS=docs/img pytest tests/test_review_web.py` also writes the README screenshots.
"""

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from tests.evals_helpers import demo_run
from k2lab.evals.review import ReviewSession, make_server
from k2lab.runs import read_jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip, dev extra) is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install -y chromium")
SHOTS = os.environ.get("K2LAB_SCREENSHOTS")


@pytest.fixture
def served(tmp_path):
    run_dir = demo_run(tmp_path)
    server = make_server(ReviewSession(run_dir, reviewer="browser"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield run_dir, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_accept_and_overrule_in_the_browser(served):
    run_dir, url = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        assert "Omniscience Index" in page.inner_text("#metrics")
        accept = page.locator("#item-py-03")
        accept.locator("input[name=reason]").fill("value matches")
        accept.locator("button.accept").click()
        page.wait_for_load_state()
        assert "accepted: CORRECT (value matches)" in page.inner_text("#item-py-03 .status")

        card = page.locator("#item-py-37")
        card.locator("button.overrule").click()  # no reason: refused, nothing stored
        page.wait_for_load_state()
        assert "an overrule needs a reason" in page.inner_text(".msg")
        assert len(read_jsonl(run_dir / "reviews.jsonl")) == 1

        page.goto(url)
        card = page.locator("#item-py-37")
        card.locator("input[name=reason]").fill("missing padding is a typo-level slip here")
        card.locator("select[name=grade]").select_option("C")
        card.locator("button.overrule").click()
        page.wait_for_load_state()
        assert "overruled: PARTIAL_ANSWER" in page.inner_text("#item-py-37 .status")
        metrics = page.inner_text("#metrics")
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(SHOTS) / "review_web.png"), full_page=True)
        browser.close()

    reviews = read_jsonl(run_dir / "reviews.jsonl")
    assert [(r["id"], r["action"], r["grade"], r["judge_grade"], r["reviewer"]) for r in reviews] == [
        ("py-03", "accept", "A", "A", "browser"), ("py-37", "overrule", "C", "B", "browser")]
    results = json.loads((run_dir / "results.json").read_text())
    # judge: A B B D B -> after review A B B D C; PARTIAL counted incorrect: 1 correct, 4 - 1 - 1 = 3 incorrect
    assert results["overall"]["partial_answer"] == 1 and results["overruled"] == 1
    assert results["overall"]["omniscience_index"] == pytest.approx(100 * (1 - 3) / 5)
    assert "-40.000" in metrics and "reviewed 2/5, overruled 1" in " ".join(metrics.split())

