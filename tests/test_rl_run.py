"""`k2lab rl` end to end on a tiny random model and a tiny tokenizer: arithmetic (tools) and knowledge
(calibration) episodes, per-step metrics, plots, resume after kill -9 with identical metrics; and, on the real
model through the training loop, an RL step moves probability toward the above-mean-reward samples."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from k2lab.runs import read_jsonl
from k2lab.serve.rollout import InProcessGenerator, RolloutParams
from k2lab.train.loop import train
from k2lab.train.rl import rewards
from k2lab.train.rl.run import rl_loss
from k2lab.train.rl.trajectory import Trajectory, collate
from k2lab.train.settings import TrainSettings
from tests.conftest import random_model, tiny_config

TIMING = ("tokens_per_s",)  # wall-clock; every other metric is reproduced exactly


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random model saved with a 640-id tokenizer (the checkpoint layout `k2lab rl` reads)."""
    from k2lab.checkpoint import save_model
    from k2lab.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("policy")
    tok = train_tokenizer(640, out_dir=d, max_bytes=100_000)
    config = tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         pad_token_id=tok.pad_id)
    save_model(random_model(config, seed=0), d)
    return d


def _launch(ckpt, run_dir, *extra):
    args = ["--checkpoint", str(ckpt), "--env", "arithmetic,knowledge", "--run-dir", str(run_dir),
            "--max-steps", "4", "--save-every", "1", "--batch-size", "4", "--samples", "2",
            "--max-new-tokens", "12", "--max-turns", "2", "--optimizer", "adamw", "--lr", "1e-3", "--no-compile", *extra]
    return subprocess.Popen([sys.executable, "-m", "k2lab.cli", "rl", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _kill_after(proc, run_dir, steps: int) -> None:
    """kill -9 once `steps` steps are logged (and checkpointed, with --save-every 1)."""
    deadline = time.time() + 900
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= steps:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_rl_command_runs_logs_metrics_and_resumes_after_kill_identically(ckpt, tmp_path):
    ref = _launch(ckpt, tmp_path / "ref")
    out, err = ref.communicate(timeout=900)
    assert ref.returncode == 0, err.decode()[-2000:]
    expected = _metrics(tmp_path / "ref")
    assert [r["step"] for r in expected] == [1, 2, 3, 4] and json.loads(out.decode().splitlines()[-1])["step"] == 4
    for r in expected:
        assert r["policy_version"] == r["step"] - 1
        assert {"reward", "reward_budget", "reward_rubric", "reward_calibration", "accuracy", "abstention_rate",
                "hallucination_rate", "response_tokens", "entropy", "all_equal_groups", "log_ratio_mean",
                "log_ratio_max_abs", "temperature"} <= set(r)
        assert 0 < r["response_tokens"] <= 2 * 12 and r["entropy"] > 0
        assert r["log_ratio_max_abs"] < 1e-3  # on-policy: the loss's log-probs are the sampler's
    # temperature decay: each step samples at the cosine schedule's value for that step (1.0 -> 0.6 by default)
    assert [r["temperature"] for r in expected] == [rewards.temperature(step, 4, 1.0, 0.6) for step in range(4)]
    assert expected[0]["temperature"] == 1.0 and expected[-1]["temperature"] < 1.0
    assert (tmp_path / "ref" / "plots" / "rewards.png").is_file()  # reward, accuracy, rates per step

    killed = tmp_path / "killed"
    proc = _launch(ckpt, killed)
    _kill_after(proc, killed, 2)
    resumed = _launch(ckpt, killed)
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert _metrics(killed) == expected


def test_bad_rl_input_is_one_line(ckpt, tmp_path):
    from typer.testing import CliRunner

    from k2lab.cli import app

    base = ["rl", "--checkpoint", str(ckpt), "--run-dir", str(tmp_path / "bad")]
    for extra, needle in ((["--env", "chess"], "unknown environment"), (["--samples", "3"], "whole groups"),
                          (["--loss", "ppo"], "unknown loss"), (["--checkpoint", str(tmp_path)], "no config.json"),
                          (["--calibration-reward", "log"], "choose ternary or brier")):
        r = CliRunner().invoke(app, base + extra)
        assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output, r.output
        assert len([ln for ln in r.output.splitlines() if ln.startswith("error: ")]) == 1, r.output
    assert not (tmp_path / "bad").exists()  # nothing claimed for a run that could not start


LOW = 64  # the "pattern": completion tokens with id < LOW earn reward


@pytest.mark.parametrize("loss", ["k15", "k25", "grpo"])
def test_rl_steps_move_probability_toward_rewarded_samples(loss, tmp_path):
    """Reward = the share of a completion's tokens with id < LOW. A few steps of the loop with the RL loss on
    the real model raise the probability of such tokens at the prompts' next position."""
    config = tiny_config()
    prompts = [[5, 9, 14, 30], [40, 2, 77]]
    k = 8

    def low_mass(model):
        with torch.no_grad():
            return sum(float(model(torch.tensor([p]))[0, -1].float().softmax(-1)[:LOW].sum()) for p in prompts)

    policy = {}

    def batches(step):
        gen = InProcessGenerator(policy["model"], policy_version=step)
        samples = gen.generate(prompts, k, RolloutParams(max_new_tokens=4, seed=step))
        trajs = []
        for s in samples:
            t = Trajectory(prompt_ids=s.prompt_ids, policy_version=step)
            t.add_sampled(s.completion_ids, s.logprobs)
            share = sum(i < LOW for i in s.completion_ids) / len(s.completion_ids)
            t.set_reward({"pattern": share}, share)
            trajs.append(t)
        b = collate(trajs, k, config.pad_token_id)
        return {"tokens": b.input_ids, "loss_mask": b.mask, "sampled": b.mask, "old_logprobs": b.old_logprobs,
                "rewards": b.rewards, "temperature": torch.ones(len(trajs))}

    s = TrainSettings(batch_size=len(prompts) * k, max_steps=10, warmup_steps=1, lr=1e-2, optimizer="adamw",
                      weight_decay=0.0, grad_clip=10.0)
    start = random_model(config, seed=1)
    before = low_mass(start)
    train(s, tmp_path / "run", lambda: random_model(config, seed=1), batches,
          loss_fn=lambda m, tokens, **b: rl_loss(m, tokens, **b, loss=loss, k=k, tau=0.1),
          on_model=lambda m: policy.update(model=m))
    after = low_mass(policy["model"].eval())
    assert after > before * 1.5, (before, after)


def test_group_loss_over_micro_batches_equals_the_whole_batch(tmp_path):
    """The loop takes a 0-dim loss as the micro-batch's mean: with whole groups per micro-batch, grad_accum 2
    logs the same loss and gradient norm as grad_accum 1."""
    config = tiny_config()
    k, prompts = 4, [[5, 9, 14], [40, 2, 77, 3]]
    samples = InProcessGenerator(random_model(config, seed=3)).generate(prompts, k, RolloutParams(max_new_tokens=5))
    trajs = []
    for i, s in enumerate(samples):
        t = Trajectory(prompt_ids=s.prompt_ids, policy_version=0)
        t.add_sampled(s.completion_ids, s.logprobs)
        t.set_reward({"r": float(i % 3)}, float(i % 3))
        trajs.append(t)
    b = collate(trajs, k, config.pad_token_id)
    batch = {"tokens": b.input_ids, "loss_mask": b.mask, "sampled": b.mask, "old_logprobs": b.old_logprobs,
             "rewards": b.rewards, "temperature": torch.ones(len(trajs))}
    out = {}
    for accum in (1, 2):
        s = TrainSettings(batch_size=len(trajs), grad_accum=accum, max_steps=1, warmup_steps=0, optimizer="adamw")
        out[accum] = train(s, tmp_path / f"a{accum}", lambda: random_model(config, seed=3), lambda step: batch,
                           loss_fn=lambda m, tokens, **kw: rl_loss(m, tokens, **kw, loss="k15", k=k, tau=0.1))
    assert out[1]["loss"] > 0 and abs(out[1]["loss"] - out[2]["loss"]) < 1e-6
    assert out[1]["grad_norm"] > 0 and abs(out[1]["grad_norm"] / out[2]["grad_norm"] - 1) < 1e-4


def _rl(ckpt, run_dir, **kw):
    from k2lab.train.rl.run import rl
    from k2lab.train.settings import RLSettings

    s = RLSettings(checkpoint=str(ckpt), run_dir=str(run_dir), batch_size=4, samples=2, max_turns=1,
                   optimizer="adamw", lr=1e-3, **{"env": "mental", "max_steps": 3, "max_new_tokens": 8, **kw})
    rl(s)
    return _metrics(run_dir)


@pytest.fixture(scope="module")
def ptx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ptx") / "curated.jsonl"
    convs = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                           {"role": "assistant", "content": str(i + 1)}]} for i in range(6)]
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    return path


def test_ptx_adds_the_curated_cross_entropy_to_the_loss_and_resumes_exactly(ckpt, ptx_file, tmp_path):
    """PTX rows travel in the loop's batch and the loss fn adds their weighted cross-entropy: the first step's
    rollouts are the same with and without it, its loss is not. A run killed after step 2 and rerun logs what an
    uninterrupted run logs (the PTX rows are a function of (seed, step), kept in the run directory)."""
    base = ["--env", "mental", "--max-turns", "1", "--max-new-tokens", "8"]
    args = [*base, "--max-steps", "3", "--ptx-data", str(ptx_file), "--ptx-weight", "0.5", "--ptx-seq-len", "64"]
    runs = {"plain": _launch(ckpt, tmp_path / "plain", *base, "--max-steps", "1"),
            "ptx": _launch(ckpt, tmp_path / "ptx", *args)}
    for name, proc in runs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err.decode()[-2000:]
    plain, ptx = _metrics(tmp_path / "plain"), _metrics(tmp_path / "ptx")
    assert ptx[0]["ptx_loss"] > 0 and "ptx_loss" not in plain[0]
    for key in ("reward", "response_tokens", "entropy"):
        assert ptx[0][key] == plain[0][key]
    assert abs(ptx[0]["loss"] - plain[0]["loss"] - 0.5 * ptx[0]["ptx_loss"]) < 1e-3 * ptx[0]["ptx_loss"]
    assert (tmp_path / "ptx" / "data" / "ptx.pt").is_file()
    steps = [r["step"] for r in read_jsonl(tmp_path / "ptx" / "timings.jsonl")]
    assert steps == [1, 2, 3]  # wall-clock shares are logged apart from the metrics

    killed = tmp_path / "killed"
    _kill_after(_launch(ckpt, killed, *args), killed, 2)
    resumed = _launch(ckpt, killed, *args)
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert _metrics(killed) == ptx


def test_ptx_rows_sets_how_many_curated_rows_a_step_carries_and_they_split_over_micro_batches(ckpt, ptx_file,
                                                                                              tmp_path):
    """--ptx-rows 2 (one per prompt here) instead of one per trajectory: the logged PTX loss is that of the first 2
    rows the (seed, step) order deals, the step's loss rises by exactly weight x it, and with --grad-accum 2 each
    micro-batch takes one row and the step logs the mean of their two losses (what it optimized). The logged value
    comes from the loss's own forward (no second pass). A count the micro-batches cannot share is refused."""
    import torch

    import k2lab
    from k2lab.train.rl.run import ptx_loss
    from k2lab.train.settings import RLSettings
    from k2lab.train.sft import batches_from, load_packed

    ptx = {"ptx_data": str(ptx_file), "ptx_weight": 0.5, "ptx_seq_len": 64, "max_steps": 1}
    (plain,) = _rl(ckpt, tmp_path / "plain", max_steps=1)
    (rows,) = _rl(ckpt, tmp_path / "rows", ptx_rows=2, **ptx)
    (split,) = _rl(ckpt, tmp_path / "split", ptx_rows=2, grad_accum=2, **ptx)
    packed = load_packed(tmp_path / "rows" / "data" / "ptx.pt")
    b = batches_from(packed, 2, 0)(0)
    other = batches_from(packed, 4, 0)(0)  # one row per trajectory, as without --ptx-rows: another loss
    assert len(b["tokens"]) == 2
    model = k2lab.load_model(str(ckpt), dtype=torch.float32)
    with torch.no_grad():
        expected = float(ptx_loss(model, b["tokens"], b["loss_mask"], b["document_ids"]))
        per_trajectory = float(ptx_loss(model, other["tokens"], other["loss_mask"], other["document_ids"]))
        per_row = [float(ptx_loss(model, *(b[k][i:i + 1] for k in ("tokens", "loss_mask", "document_ids"))))
                   for i in range(2)]
    assert abs(rows["ptx_loss"] - expected) < 1e-5 and abs(per_trajectory - expected) > 1e-4
    assert rows["reward"] == plain["reward"] == split["reward"]
    assert abs(rows["loss"] - plain["loss"] - 0.5 * rows["ptx_loss"]) < 1e-3 * rows["ptx_loss"]
    assert abs(split["ptx_loss"] - sum(per_row) / 2) < 1e-5
    with pytest.raises(ValueError, match="--ptx-rows 3: must be 0"):
        RLSettings(checkpoint=str(ckpt), ptx_rows=3, grad_accum=2, batch_size=4, samples=2).check()


def test_rl_on_the_coding_environment_scores_in_the_sandbox(ckpt, tmp_path):
    (r,) = _rl(ckpt, tmp_path / "coding", env="coding", max_steps=1, max_new_tokens=6)
    assert r["reward_unit_tests"] == 0.0 and r["accuracy"] == 0.0  # six random tokens pass no test
    (t,) = read_jsonl(tmp_path / "coding" / "timings.jsonl")
    assert t["reward_s"] > 0 and t["generate_s"] > 0


def test_rl_in_thinking_mode_with_the_brier_reward(ckpt, tmp_path):
    """`--thinking --calibration-reward brier` on the knowledge environment: episodes open <think>, knowledge
    answers earn the Brier component, and the confidence metrics are logged."""
    rows = _rl(ckpt, tmp_path / "think", env="knowledge", max_steps=2, thinking=True, calibration_reward="brier")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert "reward_brier" in r and "reward_calibration" not in r and "confidence_stated" in r
        assert r["reward_brier"] <= 0.75  # random tokens state no confidence (0) or decline (0.75) at best
    import k2lab
    from k2lab.tokenizer import Tokenizer
    from k2lab.train.rl.rollouts import Rollouts
    from k2lab.train.settings import RLSettings

    s = RLSettings(checkpoint=str(ckpt), env="knowledge", batch_size=4, samples=2, max_turns=1, max_new_tokens=4,
                   thinking=True, calibration_reward="brier", compile=False)
    rollouts = Rollouts(s, Tokenizer.load(ckpt), 4096, tmp_path / "play")
    rollouts.attach(k2lab.load_model(str(ckpt)))
    trajs, grades, _ = rollouts.play(0, 1.0)
    tok = Tokenizer.load(ckpt)
    for t, g in zip(trajs, grades):  # the settings reach the episodes: <think> opened, a confidence asked for
        assert tok.decode(t.prompt_ids).endswith("<think>") and "Confidence: p" in tok.decode(t.prompt_ids)
        assert "brier" in t.rewards and "confidence" in g


def test_the_wrong_reward_reaches_the_episodes(ckpt, tmp_path):
    """`--wrong-reward`: a wrong knowledge answer earns that value in the rollouts (the untrained model's random
    tokens are wrong answers); a value that is not below 0 is refused with one line."""
    from typer.testing import CliRunner

    import k2lab
    from k2lab.cli import app
    from k2lab.tokenizer import Tokenizer
    from k2lab.train.rl.rollouts import Rollouts
    from k2lab.train.settings import RLSettings

    s = RLSettings(checkpoint=str(ckpt), env="knowledge", batch_size=4, samples=2, max_turns=1, max_new_tokens=4,
                   wrong_reward=-0.25, compile=False)
    rollouts = Rollouts(s, Tokenizer.load(ckpt), 4096, tmp_path / "play")
    rollouts.attach(k2lab.load_model(str(ckpt)))
    trajs, grades, _ = rollouts.play(0, 1.0)
    wrong = [t for t, g in zip(trajs, grades) if g["grade"] == "wrong"]
    assert wrong and all(t.rewards["calibration"] == -0.25 for t in wrong)
    r = CliRunner().invoke(app, ["rl", "--checkpoint", str(ckpt), "--run-dir", str(tmp_path / "run"),
                                 "--env", "knowledge", "--wrong-reward", "0"])
    assert r.exit_code == 1 and "--wrong-reward" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_bad_ptx_input_is_one_line(ckpt, tmp_path):
    from typer.testing import CliRunner

    from k2lab.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "no"}\n')
    base = ["rl", "--checkpoint", str(ckpt), "--run-dir", str(tmp_path / "run")]
    for extra, needle in ((["--ptx-data", str(tmp_path / "none.jsonl")], "no such file"),
                          (["--ptx-data", str(bad)], "'messages' list"),
                          (["--ptx-data", str(bad), "--ptx-weight", "0"], "--ptx-weight 0.0: must be > 0"),
                          (["--ptx-data", str(bad), "--ptx-seq-len", "1"], "--ptx-seq-len 1: must be >= 2")):
        r = CliRunner().invoke(app, base + extra)
        assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "run").exists()
