"""The trainer on the real tiny model: reproducible runs and exact resume after SIGKILL at the default thread
count, short runs with default settings, a finished run given again, clear errors on bad input.

The run's tokenizer is replaced by a byte-level encoder here (tests only; the thing under test is the trainer).
Text comes from a few real standard-library files given by path.
"""

import json
import math
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from k2lab.checkpoint import CheckpointError
from k2lab.cli import app
from k2lab.optim.schedules import lr_factor, warmup
from k2lab.train.checkpoint import checkpoint_dirs
from k2lab.train.data import build_dataset, copy_rows
from k2lab.train.metrics import read_metrics
from k2lab.train.pretrain import PretrainSettings, pretrain

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = [str(STDLIB / f) for f in ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py")]


class ByteTokenizer:
    """UTF-8 bytes as token ids (test double for the run's tokenizer)."""

    def encode(self, text):
        return list(text.encode())


@pytest.fixture
def one_thread():
    """In-process tests that only check errors and files run on 1 thread: 2 threads on the 2 shared cores
    contend with other jobs and run many times slower. The reproducibility tests run at the default count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def settings(run_dir, **kw):
    base = dict(run_dir=str(run_dir), data=FILES, seq_len=32, batch_size=4, grad_accum=2, max_steps=8,
                warmup_steps=2, val_rows=4, eval_every=4, save_every=2, lr=3e-3, qk_clip_tau=0.25)
    return PretrainSettings(**{**base, **kw})


RUN = """
import sys, json, torch
from k2lab.train.pretrain import PretrainSettings, pretrain
class ByteTokenizer:
    def encode(self, text):
        return list(text.encode())
pretrain(PretrainSettings(**json.loads(sys.argv[1])), tokenizer=ByteTokenizer())
"""


def _launch(s):
    import dataclasses

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's default thread count
    return subprocess.Popen([sys.executable, "-c", RUN, json.dumps(dataclasses.asdict(s))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _losses(run_dir):
    return [(r["step"], r["loss"], r["max_logit"], r.get("val_loss")) for r in read_metrics(run_dir)]


def test_same_command_twice_and_sigkill_resume_log_identical_losses(tmp_path):
    """At the default thread count (2 here): a run, and a run killed with SIGKILL mid-way and resumed, log
    bit-identical losses (the MoE combine and every other kernel are deterministic). The killed run's steps before
    the kill are the same command run a second time; its steps after the resume need that and an exact resume."""
    p = _launch(settings(tmp_path / "ref"))  # one process at a time: 2-thread processes side by side thrash 2 cores
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    killed_dir = tmp_path / "killed"
    proc = _launch(settings(killed_dir))
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill mid-way: after step 5 is logged, past the step-4 checkpoint
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in checkpoint_dirs(killed_dir)][-1] in ("step-000004", "step-000006")
    resumed = _launch(settings(killed_dir))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()
    expected = _losses(tmp_path / "ref")
    assert [r[0] for r in expected] == list(range(1, 9))
    assert _losses(killed_dir) == expected  # bit for bit: the same command twice until the kill, then the same
    # data rows, weights, optimizer state and RNG after it; each step logged once
    assert any(c > 0 for r in read_metrics(killed_dir) for c in r["heads_clipped"])  # QK-Clip was active
    assert (killed_dir / "plots" / "max_logit.png").exists()
    assert (killed_dir / "checkpoints" / "step-000008" / "config.json").exists()


def _first_run(tmp_path):
    s = settings(tmp_path / "run", max_steps=2, save_every=1, grad_accum=1, warmup_steps=1)
    pretrain(s, tokenizer=ByteTokenizer())
    return s


def _snapshot(run_dir):
    return {p: p.read_bytes() for d in checkpoint_dirs(run_dir) for p in sorted(d.iterdir())}


def test_unreadable_corpus_file_is_a_clear_error(tmp_path, one_thread):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="cannot read corpus file .*nope.txt"):
        pretrain(settings(tmp_path / "run", data=[str(missing)]), tokenizer=ByteTokenizer())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        pretrain(settings(tmp_path / "run2", data=[str(bad)]), tokenizer=ByteTokenizer())


def test_run_dir_from_another_config_and_corrupt_checkpoint(tmp_path, one_thread):
    s = _first_run(tmp_path)
    before = _snapshot(Path(s.run_dir))
    with pytest.raises(ValueError, match="other settings .*lr"):
        pretrain(settings(tmp_path / "run", max_steps=2, save_every=1, grad_accum=1, warmup_steps=1, lr=1e-3),
                 tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="other settings .*model"):
        pretrain(settings(tmp_path / "run", max_steps=2, save_every=1, grad_accum=1, warmup_steps=1, preset="small"),
                 tokenizer=ByteTokenizer())
    assert _snapshot(Path(s.run_dir)) == before
    latest = checkpoint_dirs(Path(s.run_dir))[-1]
    (latest / "optimizer.pt").write_bytes(b"garbage")
    before = _snapshot(Path(s.run_dir))
    s.max_steps = 3  # continue the finished run: it resumes from the corrupt checkpoint
    with pytest.raises(CheckpointError, match="step-000002 is corrupt.*optimizer.pt"):
        pretrain(s, tokenizer=ByteTokenizer())
    shard = next(latest.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: 100])
    before = _snapshot(Path(s.run_dir))
    with pytest.raises(CheckpointError, match="step-000002 is corrupt"):
        pretrain(s, tokenizer=ByteTokenizer())
    assert _snapshot(Path(s.run_dir)) == before


def test_short_runs_work_with_the_default_warmup(tmp_path, one_thread):
    for n in (1, 3):
        s = settings(tmp_path / f"run{n}", max_steps=n, warmup_steps=None, save_every=0, eval_every=50)
        last = pretrain(s, tokenizer=ByteTokenizer())
        assert last["step"] == n and math.isfinite(last["loss"]) and "val_loss" in last
        assert last["lr"] > 0
    for n in range(1, 400):  # every length schedules with the defaults; warm-up is min(20, 10% of the run)
        factors = [lr_factor(i, schedule="wsd", max_steps=n, warmup_steps=None) for i in range(n)]
        assert all(0 < f <= 1 for f in factors)
    assert warmup(3, None) == 0 and warmup(100, None) == 10 and warmup(1000, None) == 20
    with pytest.raises(ValueError, match="warmup_steps 20 .*--warmup-steps"):
        settings(tmp_path / "bad", max_steps=3, warmup_steps=20).check()


def test_a_finished_run_given_again_says_so(tmp_path, one_thread):
    s = _first_run(tmp_path)
    with pytest.raises(ValueError, match="already finished at step 2; pass a larger --max-steps"):
        pretrain(s, tokenizer=ByteTokenizer())
    args = ["pretrain", "--run-dir", s.run_dir, "--seq-len", "32", "--batch-size", "4", "--max-steps", "2",
            "--warmup-steps", "1", "--val-rows", "4", "--eval-every", "4", "--save-every", "1", "--lr", "3e-3",
            "--qk-clip-tau", "0.25", *[a for f in FILES for a in ("--data", f)]]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip() == f"error: {s.run_dir} already finished at step 2; pass a larger --max-steps to " \
                                 f"continue or another --run-dir"
    res = CliRunner().invoke(app, [a if a != "2" else "3" for a in args])  # a larger --max-steps continues it
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in read_metrics(s.run_dir)] == [1, 2, 3]


def test_tied_embeddings_train_save_and_resume_tied(tmp_path, one_thread):
    """--tie-embeddings: one matrix in and out through training, the checkpoint (stored once, config flag set)
    and a resumed run; a checkpoint's own config decides when a run starts from one."""
    import k2lab

    s = settings(tmp_path / "tied", tie_embeddings=True, max_steps=2, warmup_steps=1, save_every=1)
    pretrain(s, tokenizer=ByteTokenizer())
    ckpt = checkpoint_dirs(tmp_path / "tied")[-1]
    assert json.loads((ckpt / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    before = k2lab.load_model(ckpt)
    assert before.lm_head.weight is before.model.embed_tokens.weight
    pretrain(settings(tmp_path / "tied", tie_embeddings=True, max_steps=3, warmup_steps=1, save_every=1),
             tokenizer=ByteTokenizer())
    after = k2lab.load_model(checkpoint_dirs(tmp_path / "tied")[-1])
    assert after.lm_head.weight is after.model.embed_tokens.weight
    assert not torch.equal(after.lm_head.weight, before.lm_head.weight)  # the one matrix kept training
    assert [r["step"] for r in read_metrics(s.run_dir)] == [1, 2, 3]
    with pytest.raises(ValueError, match="--tie-embeddings shapes a new model"):
        settings(tmp_path / "other", tie_embeddings=True, init_from=str(ckpt)).check()


def test_copy_rows_are_repeated_random_sequences_mixed_into_training(tmp_path, one_thread):
    """--copy-rows: a share of the training rows is a random sequence of ordinary tokens repeated (after its
    first reading predictable only by copying), seeded, never in the held-out rows; shares are validated."""
    rows = copy_rows(127, 50, 7936, seed=0)
    assert rows.shape == (50, 128) and rows.dtype == np.int32 and 0 <= rows.min() and rows.max() < 7936
    for row in rows:
        period = next(n for n in range(8, 65) if np.array_equal(row[n:], row[:-n]))
        assert len(set(row[:period].tolist())) > 1
    assert np.array_equal(rows, copy_rows(127, 50, 7936, seed=0)) and not np.array_equal(rows, copy_rows(
        127, 50, 7936, seed=1))
    s = settings(tmp_path / "copy", copy_rows=0.5, max_steps=2, warmup_steps=1, save_every=0, eval_every=50)
    pretrain(s, tokenizer=ByteTokenizer())
    train_rows, val = (np.load(tmp_path / "copy" / "data" / f) for f in ("train.npy", "val.npy"))
    copied = (train_rows >= 256).any(axis=1)  # the byte-level text has ids < 256
    assert copied.sum() == round(2 * 4 * 0.5) and (val < 256).all()
    settings(tmp_path / "all", copy_rows=1.0).check()  # a copying warm-up: nothing but copy rows
    for bad in (dict(copy_rows=1.1), dict(copy_rows=-0.1), dict(copy_rows=0.6, encyclopedia=0.5)):
        with pytest.raises(ValueError, match="copy_rows"):
            settings(tmp_path / "bad", **bad).check()
    with pytest.raises(ValueError, match="give --encyclopedia X"):
        settings(tmp_path / "bad", encyclopedia_qa=True).check()
    with pytest.raises(ValueError, match="choose text or chat"):
        settings(tmp_path / "bad", encyclopedia=0.2, encyclopedia_qa=True, encyclopedia_qa_format="html").check()
    with pytest.raises(ValueError, match="give --encyclopedia-qa too"):
        settings(tmp_path / "bad", encyclopedia=0.2, encyclopedia_qa_format="chat").check()
    with pytest.raises(ValueError, match="--encyclopedia-qa-entities says"):
        settings(tmp_path / "bad", encyclopedia=0.2, encyclopedia_qa_entities="half").check()
    with pytest.raises(ValueError, match="choose all or half"):
        settings(tmp_path / "bad", encyclopedia=0.2, encyclopedia_qa=True, encyclopedia_qa_entities="most").check()
    res = CliRunner().invoke(app, ["pretrain", "--run-dir", str(tmp_path / "cli"), "--copy-rows", "2"])
    assert res.exit_code == 1 and "Traceback" not in res.output and "copy_rows (2.0)" in res.output


def test_cli_options_are_the_settings_fields():
    """Every PretrainSettings field is a `k2lab pretrain` option with its help text (generated, no drift)."""
    import dataclasses

    res = CliRunner().invoke(app, ["pretrain", "--help"], terminal_width=200)
    assert res.exit_code == 0
    for f in dataclasses.fields(PretrainSettings):
        assert "--" + f.name.replace("_", "-") in res.output
        assert f.metadata["help"].split()[0] in res.output
    assert all(opt in res.output for opt in ("--decay-frac", "--bias-update-speed", "--grad-clip", "--qat"))


def test_held_out_rows_are_spread_over_the_text_training_reads(tmp_path):
    """Documents whose tokens are their own index: the held-out rows come from many documents, interleaved
    with the ones training reads, not from the first documents of the shuffled order."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"{i} " * 300}) + "\n" for i in range(1, 400)))
    encode = lambda text: [int(t) for t in text.split()]  # noqa: E731
    build_dataset([docs], encode, 0, 15, train_rows=300, val_rows=12, seed=0, out_dir=tmp_path / "data")
    train_rows, val_rows = (np.load(tmp_path / "data" / f"{n}.npy") for n in ("train", "val"))
    assert val_rows.shape == (12, 16) and train_rows.shape[0] >= 300
    val_docs = {int(t) for row in val_rows for t in row if t}
    train_docs = {int(t) for row in train_rows for t in row if t}
    assert len(val_docs) >= 6  # many documents, not one or two
    assert max(val_docs) > 0.8 * max(train_docs) and min(val_docs) < 0.2 * max(train_docs)  # spread over the walk


def test_a_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("someone else's files")
    with pytest.raises(ValueError, match="is not empty and is not a k2lab pretrain run"):
        pretrain(settings(tmp_path), tokenizer=ByteTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
