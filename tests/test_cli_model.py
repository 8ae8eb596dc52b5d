"""The model-side CLI: `k2lab info` numbers (REFERENCE §1) and `k2lab generate` from a checkpoint."""

from typer.testing import CliRunner

import k2lab
from k2lab.cli import app
from tests.conftest import random_model, tiny_config

runner = CliRunner()


def test_info_kimi_k26_matches_published_counts():
    result = runner.invoke(app, ["info", "--preset", "kimi-k2.6"])
    assert result.exit_code == 0, result.output
    assert "1,026,408,232,448" in result.output
    assert "32,861,500,928" in result.output
    assert "70,272" in result.output
    assert "416,866,032" in result.output and "54,277,888" in result.output  # MoonViT + projector


def test_info_needs_exactly_one_source():
    assert runner.invoke(app, ["info"]).exit_code != 0
    unknown = runner.invoke(app, ["info", "--preset", "nope"])
    assert unknown.exit_code == 1 and "unknown preset 'nope'" in unknown.output


def test_generate_from_checkpoint_ids(tmp_path):
    model = random_model(tiny_config())
    k2lab.save_model(model, tmp_path)
    result = runner.invoke(app, ["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1,2,3",
                                 "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    import torch
    expected = model.generate(torch.tensor([[1, 2, 3]]), 5, eos_token_id=model.config.eos_token_id)[0, 3:]
    assert result.output.strip() == ",".join(map(str, expected.tolist()))
    bad = runner.invoke(app, ["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1,x"])
    assert bad.exit_code == 2 and "comma-separated integers" in bad.output
