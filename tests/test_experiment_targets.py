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


def test_calibration_results_other_than_the_default_never_take_the_committed_name():
    def named(rl: dict) -> str:
        return calibration.results_name({"settings": {"rl": rl}})

    assert named({}) == "post_training_calibration"  # results from before the options
    assert named({"wrong_reward": -1.0}) == "post_training_calibration"
    assert named({"wrong_reward": -0.5}) == "post_training_calibration_wrong0.5"
    assert named({"wrong_reward": -1.0, "ptx_weight": 0.1}) == "post_training_calibration_ptx0.1"
    assert named({"wrong_reward": -0.5, "ptx_weight": 1.0}) == "post_training_calibration_wrong0.5_ptx1"
    assert named({"ptx_weight": 0.1, "lr": 4e-4, "max_steps": 48}) == "post_training_calibration_ptx0.1_lr0.0004"
    assert named({"max_steps": 96}) == "post_training_calibration_steps96"
    sft_lr = {"settings": {"rl": {}, "sft": {"lr": 1e-3}}}
    assert calibration.results_name(sft_lr) == "post_training_calibration_sftlr0.001"


def test_a_missing_base_is_one_line_that_names_the_directory_it_was_relative_to(tmp_path, monkeypatch):
    import pytest

    from common import require_base

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # at the repository root the hint about where to run from is noise
    with pytest.raises(SystemExit) as e:
        require_base("runs/nowhere/checkpoints/step-000800")
    assert str(e.value) == ("--base runs/nowhere/checkpoints/step-000800: no checkpoint there; run `make run` first "
                            "or pass a pre-trained checkpoint")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        require_base("runs/nowhere", "--init-from", "pass one")
    assert str(e.value) == (f"--init-from runs/nowhere: no checkpoint there (relative to {tmp_path.resolve()}; "
                            f"the repository root is {root}); pass one")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    require_base(str(tmp_path / "ckpt"))  # a checkpoint directory passes
