"""QAT: fake-quantized experts with straight-through gradients, the export, and the `qat` / `quantize` CLI."""

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import k2lab
from k2lab.cli import app
from k2lab.quant import int4
from k2lab.quant.checkpoint import quantize_experts_
from k2lab.quant.experts import Int4Experts
from k2lab.quant.qat import QATExperts, enable_qat_
from k2lab.train.loop import token_losses
from tests.conftest import random_model, tiny_config


def _experts(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def test_qat_forward_sees_int4_weights_and_gradients_pass_straight_through():
    model = random_model(tiny_config())
    reference = copy.deepcopy(model)  # full precision, experts overwritten with their INT4 values
    with torch.no_grad():
        for ex in _experts(reference, torch.nn.Module):
            if type(ex).__name__ == "Experts":
                for p in ("gate_proj", "up_proj", "down_proj"):
                    getattr(ex, p).copy_(int4.fake_quantize(getattr(ex, p)))
    params = {id(p) for p in model.parameters()}
    enable_qat_(model)
    assert {id(p) for p in model.parameters()} == params  # same parameter objects: optimizers keep working
    assert len(_experts(model, QATExperts)) == 2
    tokens = torch.randint(0, 256, (2, 17))
    loss, ref_loss = token_losses(model, tokens).mean(), token_losses(reference, tokens).mean()
    assert torch.equal(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    for a, b in zip(_experts(model, QATExperts), [m for m in reference.modules() if type(m).__name__ == "Experts"]):
        assert a.gate_proj.grad.abs().sum() > 0
        assert torch.equal(a.gate_proj.grad, b.gate_proj.grad)  # STE: d/d latent = d/d quantized weight
        assert torch.equal(a.down_proj.grad, b.down_proj.grad)


def test_export_of_qat_model_is_what_it_trained():
    model = enable_qat_(random_model(tiny_config()))
    latent = [(m.gate_proj.detach().clone(), m.up_proj.detach().clone(), m.down_proj.detach().clone())
              for m in _experts(model, QATExperts)]
    quantize_experts_(model)
    for weights, m in zip(latent, _experts(model, Int4Experts)):
        for w, dq in zip(weights, m.dequantized()):
            assert torch.equal(dq, int4.fake_quantize(w))


@pytest.fixture
def fp_ckpt(tmp_path):
    k2lab.save_model(random_model(tiny_config()), tmp_path / "fp")
    return tmp_path


def test_cli_quantize_and_qat_resume(fp_ckpt):
    runner = CliRunner()
    res = runner.invoke(app, ["quantize", "--checkpoint", str(fp_ckpt / "fp"), "--out", str(fp_ckpt / "ptq")])
    assert res.exit_code == 0, res.output
    assert isinstance(k2lab.load_model(fp_ckpt / "ptq").model.layers[1].mlp.experts, Int4Experts)
    run = fp_ckpt / "run"
    args = ["qat", "--checkpoint", str(fp_ckpt / "fp"), "--run-dir", str(run), "--lr", "1e-3",
            "--batch", "2", "--seq-len", "32"]
    assert runner.invoke(app, args + ["--max-steps", "2"]).exit_code == 0
    res = runner.invoke(app, args + ["--max-steps", "3"])  # resumes at step 2
    assert res.exit_code == 0, res.output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    qat = k2lab.load_model(run / "checkpoint")
    ptq = k2lab.load_model(fp_ckpt / "ptq")
    assert isinstance(qat.model.layers[1].mlp.experts, Int4Experts)
    assert not torch.equal(qat.lm_head.weight, ptq.lm_head.weight)  # it trained


def test_cli_qat_and_quantize_refuse_an_int4_checkpoint(fp_ckpt):
    runner = CliRunner()
    runner.invoke(app, ["quantize", "--checkpoint", str(fp_ckpt / "fp"), "--out", str(fp_ckpt / "ptq")])
    res = runner.invoke(app, ["qat", "--checkpoint", str(fp_ckpt / "ptq"), "--run-dir", str(fp_ckpt / "r"),
                              "--max-steps", "1"])
    assert res.exit_code == 1 and "already INT4" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["quantize", "--checkpoint", str(fp_ckpt / "ptq"), "--out", str(fp_ckpt / "q2")])
    assert res.exit_code == 1 and not isinstance(res.exception, ValueError), res.exception  # no traceback
    assert res.output.startswith("error: ") and "already INT4" in res.output and not (fp_ckpt / "q2").exists()


def test_pretrain_qat_mode_trains_through_int4_experts(tmp_path):
    """`k2lab pretrain --qat`: the first logged loss is the loss of the initial model with its routed experts
    replaced by their INT4 values (computed here by hand), and the checkpoint holds the full-precision latents."""
    from k2lab.config import ModelConfig
    from k2lab.model import K2ForCausalLM
    from k2lab.train.checkpoint import checkpoint_dirs
    from k2lab.train.data import PackedRows
    from k2lab.train.pretrain import pretrain
    from tests.test_pretrain import ByteTokenizer, settings

    s = settings(tmp_path / "run", max_steps=1, warmup_steps=None, qat=True, grad_accum=1)
    first = pretrain(s, tokenizer=ByteTokenizer())
    torch.manual_seed(s.seed)
    model = K2ForCausalLM(ModelConfig.preset(s.preset))
    model.init_weights(seed=s.seed)
    with torch.no_grad():
        for ex in [m for m in model.modules() if type(m).__name__ == "Experts"]:
            for p in ("gate_proj", "up_proj", "down_proj"):
                getattr(ex, p).copy_(int4.fake_quantize(getattr(ex, p)))
        rows = PackedRows(tmp_path / "run" / "data" / "train.npy", s.seed).batch(0, s.batch_size)
        assert first["loss"] == pytest.approx(token_losses(model, rows).mean().item(), rel=1e-5)
    saved = k2lab.load_model(checkpoint_dirs(tmp_path / "run")[-1])
    w = saved.model.layers[1].mlp.experts.gate_proj
    assert not torch.equal(w, int4.fake_quantize(w))  # latent weights, not the INT4 grid
