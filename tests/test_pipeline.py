"""`make run`'s pipeline end to end at a toy size: every stage runs and the report says what it measured."""

import json

import pytest

from k2lab.pipeline import run_demo


@pytest.mark.slow
def test_demo_pipeline_runs_end_to_end(tmp_path):
    report = run_demo(tmp_path / "demo", steps=6)
    text = report.read_text()
    assert "INT4" in text and "tool-call eval" in text
    data = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert data["int4"]["expert_bytes_int4_over_bf16"] <= 0.30
    assert data["served"]["toolcalls"]["answered"] == data["served"]["toolcalls"]["requests"]
    assert (tmp_path / "demo" / "int4" / "config.json").exists()
    # a second run reuses every stage's work and keeps the pre-training numbers in the report
    again = json.loads((run_demo(tmp_path / "demo", steps=6), tmp_path / "demo" / "report.json")[1].read_text())
    assert again["pretrain"]["step"] == 6 and again["pretrain"]["loss"] == data["pretrain"]["loss"]
