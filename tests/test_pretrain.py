"""The trainer on the real tiny model: exact resume after SIGKILL, clear errors on bad input.

The run's tokenizer is replaced by a byte-level encoder here (tests only; the thing under test is the trainer).
Text comes from a few real standard-library files given by path.
"""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from k2lab.checkpoint import CheckpointError
from k2lab.train.checkpoint import checkpoint_dirs
from k2lab.train.metrics import read_metrics
from k2lab.train.pretrain import PretrainSettings, pretrain

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = [str(STDLIB / f) for f in ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py")]


class ByteTokenizer:
    """UTF-8 bytes as token ids (test double for the run's tokenizer)."""

    def encode(self, text):
        return list(text.encode())


@pytest.fixture(autouse=True)
def one_thread():
    """Two threads on the 2 shared cores contend with other jobs and run many times slower."""
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

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", RUN, json.dumps(dataclasses.asdict(s))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _losses(run_dir):
    return [(r["step"], r["loss"], r["max_logit"], r.get("val_loss")) for r in read_metrics(run_dir)]


def test_sigkill_and_resume_logs_the_same_losses(tmp_path):
    ref = _launch(settings(tmp_path / "ref"))
    killed_dir = tmp_path / "killed"
    proc = _launch(settings(killed_dir))
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill mid-way: after step 5 is logged, past the step-4 checkpoint
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in checkpoint_dirs(killed_dir)][-1] in ("step-000004", "step-000006")
    resumed = _launch(settings(killed_dir))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()
    expected = _losses(tmp_path / "ref")
    assert [r[0] for r in expected] == list(range(1, 9))
    assert _losses(killed_dir) == expected  # bit-for-bit: same data rows, weights, optimizer state, RNG
    assert any(c > 0 for r in read_metrics(killed_dir) for c in r["heads_clipped"])  # QK-Clip was active
    assert (killed_dir / "plots" / "max_logit.png").exists()
    assert (killed_dir / "checkpoints" / "step-000008" / "config.json").exists()


def _first_run(tmp_path):
    s = settings(tmp_path / "run", max_steps=2, save_every=1, grad_accum=1, warmup_steps=1)
    pretrain(s, tokenizer=ByteTokenizer())
    return s


def _snapshot(run_dir):
    return {p: p.read_bytes() for d in checkpoint_dirs(run_dir) for p in sorted(d.iterdir())}


def test_unreadable_corpus_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="cannot read corpus file .*nope.txt"):
        pretrain(settings(tmp_path / "run", data=[str(missing)]), tokenizer=ByteTokenizer())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        pretrain(settings(tmp_path / "run2", data=[str(bad)]), tokenizer=ByteTokenizer())


def test_run_dir_from_another_config_and_corrupt_checkpoint(tmp_path):
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
    with pytest.raises(CheckpointError, match="step-000002 is corrupt.*optimizer.pt"):
        pretrain(s, tokenizer=ByteTokenizer())
    shard = next(latest.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: 100])
    before = _snapshot(Path(s.run_dir))
    with pytest.raises(CheckpointError, match="step-000002 is corrupt"):
        pretrain(s, tokenizer=ByteTokenizer())
    assert _snapshot(Path(s.run_dir)) == before
