"""SFT and RL under torchrun: 2 gloo processes (FSDP2, Muon on gathered shards, per-rank experts; RL: each rank
rolls out its share of the groups, which are gathered) log the metrics of 1 process with the same micro-batches
(grad_accum 2) and end with the same weights. Tiny random models and a tiny tokenizer (test doubles for a
trained policy: what is under test is the distribution of work, not the model)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import k2lab
from k2lab.runs import read_jsonl
from tests.conftest import random_model, sft_checkpoint_and_data, tiny_config

TIMING = ("tokens_per_s",)


def _torchrun(n: int, module: str, run_dir, *args) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", module,
           *args, "--run-dir", str(run_dir)]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / "metrics.jsonl")]


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return k2lab.load_model(last, dtype=torch.float32).state_dict()


def _same(one: list[dict], two: list[dict], tol: float = 1e-5) -> None:
    assert [r["step"] for r in two] == [r["step"] for r in one] and one
    for a, b in zip(one, two):
        assert set(a) == set(b)
        for key, value in a.items():
            if value is None or b[key] is None:  # a metric with nothing to measure (no such item this step)
                assert b[key] is value, (a["step"], key)
            else:
                assert b[key] == pytest.approx(value, rel=tol, abs=tol), (a["step"], key)


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory, tok_dir):
    return sft_checkpoint_and_data(tmp_path_factory.mktemp("sft"), tok_dir)


def test_sft_two_gloo_processes_match_one(sft_inputs, tmp_path):
    ckpt, data = sft_inputs
    args = ["--checkpoint", str(ckpt), "--data", str(data), "--seq-len", "512", "--batch-size", "4",
            "--max-steps", "3", "--eval-every", "3", "--val-fraction", "0.3", "--eval-max-new-tokens", "8",
            "--warmup-steps", "1", "--qk-clip-tau", "5"]
    one = _torchrun(1, "k2lab.train.sft", tmp_path / "one", *args, "--grad-accum", "2")
    two = _torchrun(2, "k2lab.train.sft", tmp_path / "two", *args)
    _same(one, two)
    assert "val_loss" in two[-1] and "toolcall_f1" in two[-1]  # held-out loss and the tool-call eval ran
    _same_weights(_final_weights(tmp_path / "one"), _final_weights(tmp_path / "two"))


def stopping_model(tok, seed: int = 0):
    """A tiny random model that ends its turn (<|im_end|>) often (its logit ~8 on average), so samples of one
    prompt differ in length and budget penalty: rewards differ within groups and the updates carry signal (with
    all-equal rewards the K1.5 gradient is ~0 and Muon would orthogonalize rounding noise)."""
    config = tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         pad_token_id=tok.pad_id)
    model = random_model(config, seed=seed)
    with torch.no_grad():
        mean = model.model(torch.randint(0, 600, (8, 40), generator=torch.Generator().manual_seed(0))).mean((0, 1))
        model.lm_head.weight[tok.im_end_id] = 8.0 * mean / mean.pow(2).sum()
    return model


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """The stopping model saved with a 640-id tokenizer (the checkpoint layout `k2lab rl` reads)."""
    from k2lab.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("policy")
    k2lab.save_model(stopping_model(train_tokenizer(640, out_dir=d, max_bytes=100_000)), d)
    return d


# arithmetic, seed 1: every group's rewards differ at both steps (asserted below; since an empty answer earns
# the wrong-answer reward, the knowledge domain gives this random model all-equal groups at every seed tried).
# A group with all-equal rewards has zero advantage, its tokens' gradients are rounding noise (~1e-8, the
# on-policy log-ratio's), and AdamW's first steps turn such noise into lr-sized updates of the embedding rows only
# those groups touch: runs that round differently would then part by ~lr on those rows, which says nothing about
# the distribution of work.
RL_ARGS = ["--env", "arithmetic", "--max-steps", "2", "--batch-size", "8", "--samples", "4",
           "--max-new-tokens", "8", "--max-turns", "2", "--lr", "1e-3", "--warmup-steps", "0", "--seed", "1",
           "--no-compile"]  # eager rollouts: the reference parity tests compare against


def test_rl_two_gloo_processes_match_one(policy, tmp_path):
    args = ["--checkpoint", str(policy), *RL_ARGS]
    one = _torchrun(1, "k2lab.train.rl.run", tmp_path / "one", *args, "--grad-accum", "2")
    two = _torchrun(2, "k2lab.train.rl.run", tmp_path / "two", *args)
    _same(one, two)
    for r in two:  # on-policy: each rank sampled with the current weights (its replica of the sharded policy)
        assert r["log_ratio_max_abs"] < 1e-3 and r["staleness_max"] == 0 and r["response_tokens"] > 0
    assert all(r["all_equal_groups"] == 0 for r in two)  # every group carried signal (see RL_ARGS)
    _same_weights(_final_weights(tmp_path / "one"), _final_weights(tmp_path / "two"))
