"""The machinery of `make run` without training: resumable stages, the report card, presets and run directories.

The stage results come from a fixture (tests/fixtures/pipeline_stages.json: the records of a real run of the
recipe at a few steps per stage), so the card is rendered from numbers shaped exactly as the stages write them.
The recipe itself runs in test_pipeline_recipe.py (slow).
"""

import json
import re
from pathlib import Path

import pytest

from k2lab.pipeline import PRESETS, run_demo
from k2lab.pipeline.card import write_report
from k2lab.pipeline.stages import Stages
from k2lab.runs import RunDirError, claim

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "pipeline_stages.json").read_text())


def _run_all(run_dir: Path, calls: list, fail_at: str | None = None, after=None) -> Stages:
    st = Stages(run_dir, after)
    for rec in FIXTURE:
        def fn(rec=rec):
            calls.append(rec["name"])
            if rec["name"] == fail_at:
                raise KeyboardInterrupt
            return rec["result"]
        st.run(rec["name"], rec["title"], fn)
    return st


def test_a_rerun_reuses_finished_stages_and_resumes_the_interrupted_one(tmp_path):
    calls: list = []
    reported: list = []
    with pytest.raises(KeyboardInterrupt):
        _run_all(tmp_path, calls, fail_at="sft", after=lambda records: reported.append([r["name"] for r in records]))
    assert calls == ["tokenizer", "pretrain", "eval_base", "synth", "sft"]
    assert reported[-1] == ["tokenizer", "pretrain", "eval_base", "synth"]  # Ctrl-C: the report of what finished
    calls.clear()
    st = _run_all(tmp_path, calls)
    assert calls == ["sft", "eval_sft", "rl", "eval_rl", "qat", "eval_int4"]  # finished stages are not run again
    sft = st.record("sft")
    assert len(sft["attempts"]) == 2 and sft["wall_s"] == pytest.approx(sum(sft["attempts"]), abs=0.02)
    assert [r["name"] for r in st.records()] == [r["name"] for r in FIXTURE]
    assert st.record("pretrain")["result"] == FIXTURE[1]["result"]


def test_the_report_keeps_every_section_on_a_rerun_and_says_what_it_measured(tmp_path):
    report = write_report(tmp_path, "default", PRESETS["default"], _run_all(tmp_path, []).records(), 12.0)
    text = report.read_text()
    again = write_report(tmp_path, "default", PRESETS["default"], _run_all(tmp_path, []).records(), 0.5).read_text()
    strip = lambda t: re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC|this invocation [\d.]+ min|load average at the end [\d.]+",
                             "", t)
    assert strip(again) == strip(text)
    for section in ("## Summary", "## Published claim | what this run measured", "## Pre-training with MuonClip",
                    "## SFT", "## RL", "## INT4 QAT", "## Evals after every stage", "## Swarm run", "## Time per stage",
                    "## Plots"):
        assert section in text
    assert "None" not in text and "nan" not in text.lower()
    qat = FIXTURE[8]["result"]["qat_agreement"]
    assert f"{qat['prompts']} x {qat['tokens_per_prompt']}" in text  # agreement over prompts x tokens
    assert f"tau {FIXTURE[1]['result']['qk_clip_tau']:g}" in text
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):  # every linked plot exists and is not empty
        assert (tmp_path / link).stat().st_size > 0
    assert "plots/evals.png" in text
    # the fixture's RL model declines every question: the summary says so, names where the cause is measured
    assert "declines (almost) every question" in text and "experiments/knowledge_extraction.py" in text
    assert "experiments/post_training_calibration.py" in text  # ... and where a remedy was measured
    data = json.loads((tmp_path / "report.json").read_text())
    assert list(data["stages"]) == [r["name"] for r in FIXTURE]
    assert data["total_stage_s"] == pytest.approx(sum(r["wall_s"] for r in data["stages"].values()))
    assert {d["claim"].split(" ")[0] for d in data["directions"]} == {"tool-call", "hallucination", "the"}
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"]


def test_a_run_directory_of_one_preset_is_refused_for_another(tmp_path):
    claim(tmp_path, {"preset": "default", "recipe": PRESETS["default"].as_dict()}, "demo")
    with pytest.raises(RunDirError, match="preset"):
        run_demo(tmp_path, "reduced")
    with pytest.raises(ValueError, match="unknown preset"):
        run_demo(tmp_path / "new", "huge")


def test_a_recipe_changed_since_the_run_is_refused_naming_the_one_number(tmp_path):
    recipe = PRESETS["default"].as_dict()
    del recipe["agent_max_tokens"]  # a run directory written before the cap existed
    claim(tmp_path, {"preset": "default", "recipe": recipe}, "demo")
    with pytest.raises(RunDirError) as e:
        run_demo(tmp_path, "default")
    msg = str(e.value)
    assert "recipe.agent_max_tokens: not set there, 256 now" in msg and len(msg) < 250, msg
    # started by `make run`, the answer also says how to pass make another directory
    from typer.testing import CliRunner

    from k2lab.cli import app
    r = CliRunner().invoke(app, ["demo", "--run-dir", str(tmp_path)], env={"MAKELEVEL": "1"})
    assert r.exit_code == 2 and "make run RUN_DIR=" in r.output and "Traceback" not in r.output, r.output


def test_the_demo_command_answers_a_preset_mismatch_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from k2lab.cli import app

    claim(tmp_path, {"preset": "default", "recipe": PRESETS["default"].as_dict()}, "demo")
    r = CliRunner().invoke(app, ["demo", "--run-dir", str(tmp_path), "--preset", "reduced"])
    assert r.exit_code == 2 and "preset" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["demo", "--run-dir", str(tmp_path / "x"), "--preset", "huge"])
    assert r.exit_code == 2 and "unknown preset" in r.output


def test_an_unfinished_run_reports_what_finished_and_where_training_stands(tmp_path):
    from k2lab.runs import append_jsonl

    st = Stages(tmp_path)
    st.run("tokenizer", FIXTURE[0]["title"], lambda: FIXTURE[0]["result"])
    append_jsonl(tmp_path / "pretrain" / "metrics.jsonl", {"step": 25, "loss": 6.0, "tokens_per_s": 40.0})
    text = write_report(tmp_path, "default", PRESETS["default"], st.records(), 1.0).read_text()
    steps = PRESETS["default"].pretrain_steps
    assert f"in progress: pretrain at step 25 of {steps}" in text and "stages not finished yet: pretrain" in text
    assert "None" not in text and "## Tokenizer" in text


def test_a_stage_whose_training_finished_is_not_trained_again(tmp_path):
    """`make run` stopped after a stage's training but before its record (QAT's quantize and agreement take about a
    minute) resumes: the finished run is not handed to the loop again, which refuses a finished run."""
    import torch

    from k2lab.pipeline.recipe import train_once
    from k2lab.train.loop import train
    from k2lab.train.settings import TrainSettings
    from tests.conftest import random_model, tiny_config

    s = TrainSettings(batch_size=2, max_steps=2, lr=1e-3, optimizer="adamw", eval_every=2)
    batches = lambda step: {"tokens": torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(step))}
    run = lambda: train(s, tmp_path, lambda: random_model(tiny_config()), batches)
    last = train_once(tmp_path, 2, run)
    assert last["step"] == 2
    with pytest.raises(RunDirError, match="already finished"):
        run()  # what the rerun did before
    assert train_once(tmp_path, 2, run) == last  # the logged record, not a new run
    called = []
    assert train_once(tmp_path, 3, lambda: called.append(1)) == {} and called == [1]


def test_the_report_shows_qat_by_self_distillation_against_ptq(tmp_path):
    """A QAT stage that distilled the RL model (tests/fixtures/qat_distill_stage.json: the record of that stage in
    a default run, 2026-12-01) is reported as such: its losses are KL, and the INT4 export is compared with the RL
    model by held-out KL and greedy agreement beside PTQ's."""
    distilled = json.loads((Path(__file__).parent / "fixtures" / "qat_distill_stage.json").read_text())
    st = Stages(tmp_path)
    for rec in FIXTURE:
        st.run(rec["name"], rec["title"], lambda rec=distilled if rec["name"] == "qat" else rec: rec["result"])
    text = write_report(tmp_path, "default", PRESETS["default"], st.records(), 1.0).read_text()
    kl = distilled["result"]["heldout_kl"]
    assert "## INT4 QAT (self-distillation from the RL model" in text and "not cross-entropy" in text
    assert f"| QAT | {kl['rows']} | {kl['tokens']} | {kl['qat']:.3g} |" in text
    assert f"| PTQ (the RL model quantized without QAT) | {kl['rows']} | {kl['tokens']} | {kl['ptq']:.3g} |" in text
    assert f"held-out KL from the RL model: QAT-INT4 {kl['qat']:.3g}, PTQ-INT4 {kl['ptq']:.3g}" in text
    assert "greedy agreement QAT-INT4 vs the RL model" in text and "INT4 export vs the RL model it distilled" in text
    assert "None" not in text and "nan" not in text.lower()


@pytest.mark.parametrize("int4_rate, says_it", [(0.67, True), (0.29, False)])
def test_the_report_says_when_qat_undid_the_calibration(tmp_path, int4_rate, says_it):
    """An INT4 model that hallucinates beyond the RL model's interval is named a limitation (the 2026-12-01 run at
    QAT lr 3e-4: 27% [15, 40] -> 67%); one inside it is not."""
    import copy

    records = copy.deepcopy(FIXTURE)
    for rec in records:
        if rec["name"] in ("eval_rl", "eval_int4"):
            rate = 0.27 if rec["name"] == "eval_rl" else int4_rate
            rec["result"]["calibration"].update(hallucination_rate=rate,
                                                hallucination_rate_ci95=[rate - 0.12, rate + 0.13])
    st = Stages(tmp_path)
    for rec in records:
        st.run(rec["name"], rec["title"], lambda rec=rec: rec["result"])
    text = write_report(tmp_path, "default", PRESETS["default"], st.records(), 1.0).read_text()
    line = "limitation: the INT4 model hallucinates more than the RL model it was made from: 67% [55, 80] against 27%"
    assert (line in text) is says_it


@pytest.mark.parametrize("repeat_nll, says_it", [(4.1, True), (0.3, False)])
def test_the_report_says_when_the_base_does_not_copy_from_its_context(tmp_path, repeat_nll, says_it):
    """The pre-training record's copying probe (k2lab.evals.copying) is in its table, and the summary names the
    missing in-context copying as a limitation only when the repeated span is not predicted much better."""
    import copy

    records = copy.deepcopy(FIXTURE)
    probe = {"first_nll": 4.2, "repeat_nll": repeat_nll, "first_top1": 0.3, "repeat_top1": 0.35, "rows": 16,
             "span": 64}
    next(r for r in records if r["name"] == "pretrain")["result"]["copying"] = probe
    st = Stages(tmp_path)
    for rec in records:
        st.run(rec["name"], rec["title"], lambda rec=rec: rec["result"])
    text = write_report(tmp_path, "default", PRESETS["default"], st.records(), 1.0).read_text()
    assert f"{repeat_nll:.2f} when it is read again right after" in text
    assert ("limitation: the pre-trained model does not copy from its context" in text) is says_it


@pytest.mark.parametrize("rl_f1, envs, ptx, says_it", [(0.186, "knowledge", 0.1, True), (0.186, "knowledge", 0.0, True),
                                                       (0.7, "knowledge", 0.1, False),
                                                       (0.186, "knowledge,toolbox", 0.1, False)])
def test_the_report_says_when_calibration_rl_lost_the_tool_calling(tmp_path, rl_f1, envs, ptx, says_it):
    """RL on calibration questions alone (the default preset) that lost much of SFT's tool-call F1 is named a
    limitation, with what brought it back and whether PTX was on; not when F1 held or when RL had tool tasks. The
    RL section has the PTX loss row and sentence when the stage logged it."""
    import copy
    import dataclasses

    records = copy.deepcopy(FIXTURE)
    f1 = {"eval_sft": 0.794, "eval_rl": rl_f1, "eval_int4": 0.678}
    for rec in records:
        if rec["name"] in f1:
            rec["result"]["toolcalls"]["trigger_f1"] = f1[rec["name"]]
        if rec["name"] == "rl" and ptx:
            rec["result"].update(ptx_loss_first=0.91, ptx_loss_last=0.88)
    st = Stages(tmp_path)
    for rec in records:
        st.run(rec["name"], rec["title"], lambda rec=rec: rec["result"])
    recipe = dataclasses.replace(PRESETS["default"], rl_envs=envs, rl_ptx_weight=ptx)
    text = write_report(tmp_path, "default", recipe, st.records(), 1.0).read_text()
    line = f"tool-call F1 0.794 (SFT) -> {rl_f1:.3g} (RL); the INT4 QAT stage trains on the SFT conversations again"
    assert (line in text) is says_it
    assert ("limitation: RL here trains on calibration questions only" in text) is says_it
    assert ("faded even with K2's PTX loss on the SFT conversations (weight 0.1, 4 rows of 1024 tokens" in text) \
        is (says_it and ptx > 0)
    assert ("faded without K2's PTX loss" in text) is (says_it and ptx == 0)
    assert ("| ptx_loss | 0.91 | 0.88 |" in text) is (ptx > 0)
    assert ("K2's PTX loss: 0.1 x the cross-entropy of 4 packed rows of 1024 tokens" in text) is (ptx > 0)
