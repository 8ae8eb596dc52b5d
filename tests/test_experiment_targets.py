"""The experiments' pass/fail verdicts (pure functions of their measurements; no model runs here)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import post_training_calibration as calibration  # noqa: E402


def _seed(halluc_change: float, known_change: float, known_rl: float) -> dict:
    return {"sft": {"hallucination_rate": 0.4, "known_accuracy": known_rl - known_change},
            "rl": {"hallucination_rate": 0.4 + halluc_change, "known_accuracy": known_rl},
            "hallucination_change": {"change": halluc_change}, "known_accuracy_change": {"change": known_change}}


def test_calibration_target_needs_the_cut_the_kept_accuracy_and_a_model_that_still_answers():
    assert calibration.summarize([_seed(-0.30, -0.01, 0.20)])["target_met_every_seed"]
    assert not calibration.summarize([_seed(-0.15, 0.0, 0.20)])["target_met_every_seed"]  # cut too small
    assert not calibration.summarize([_seed(-0.30, -0.05, 0.20)])["target_met_every_seed"]  # lost known facts
    # declining everything: hallucination 0, known accuracy 0 -> 0 meets both bars without knowing anything
    assert not calibration.summarize([_seed(-0.45, 0.0, 0.0)])["target_met_every_seed"]
    assert not calibration.summarize([_seed(-0.30, -0.01, 0.20), _seed(-0.10, 0.0, 0.2)])["target_met_every_seed"]
