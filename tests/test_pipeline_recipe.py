"""`make run`'s recipe on the reduced preset: the three directions the issue's Must show asks for.

Slow (about 20 minutes on 2 CPU cores). It runs the real recipe end to end once, as `k2lab demo --preset reduced`
in a process of its own (no fake model; torch's default thread count, not the test suite's one thread, so it
measures what that command measures), and asserts what the report claims, not just that files exist: tool-call
F1 rises from the pre-trained model to the post-trained INT4 model, calibration RL lowers the hallucination rate
below the SFT model's, and the trained model solves embedded agent tasks the pre-trained one fails. A second run
resumes in seconds and keeps every section of the report.

The third direction does not hold at this scale, and its test says so with a strict xfail: every agent task needs
a name or a number copied from the prompt or a tool result, and the tiny model does not copy from its context
(experiments/in_context_copying.py, experiments/induction_plateau.py). Strict: the day it passes, the marker must
go.
"""

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow


def demo(run_dir) -> None:
    r = subprocess.run([sys.executable, "-m", "k2lab.cli", "demo", "--preset", "reduced", "--run-dir", str(run_dir)],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reduced") / "demo"
    demo(run_dir)
    report = run_dir / "report.md"
    data = json.loads((run_dir / "report.json").read_text())
    stages = data["stages"]
    evals = {k: stages[f"eval_{k}"]["result"] for k in ("base", "sft", "rl", "int4")}
    return SimpleNamespace(run_dir=run_dir, report=report, stages=list(stages), evals=evals)


def test_reduced_recipe_runs_every_stage_and_a_rerun_reuses_them(reduced):
    run_dir, report = reduced.run_dir, reduced.report
    assert reduced.stages == ["tokenizer", "pretrain", "eval_base", "synth", "sft", "eval_sft", "rl", "eval_rl",
                              "qat", "eval_int4"]
    text = report.read_text()
    start = time.perf_counter()
    demo(run_dir)
    assert time.perf_counter() - start < 60  # every stage reused
    assert report.read_text().split("## Summary")[1] == text.split("## Summary")[1]  # same sections and numbers
    assert "None" not in text


def test_post_training_raises_toolcall_f1_above_the_base(reduced):
    evals = reduced.evals
    assert evals["int4"]["toolcalls"]["trigger_f1"] > evals["base"]["toolcalls"]["trigger_f1"]


def test_calibration_rl_lowers_hallucination_below_sft(reduced):
    evals = reduced.evals
    assert evals["rl"]["calibration"]["hallucination_rate"] < evals["sft"]["calibration"]["hallucination_rate"]


@pytest.mark.xfail(strict=True, reason="the tiny model does not copy names and numbers from its context, which "
                                       "every embedded agent task needs (experiments/in_context_copying.py)")
def test_the_trained_model_solves_agent_tasks_the_base_fails(reduced):
    evals = reduced.evals
    # tasks, not one: the reduced run's SFT model once passed a files task ("which file mentions X?") by naming
    # the right one of four by chance ("notes/meeting.txt mentions the security"); the rubric now also wants that
    # file read and no other named, but one file read at random is still the right one a quarter of the time
    assert len(set(evals["int4"]["agent"]["solved"]) - set(evals["base"]["agent"]["solved"])) >= 2
