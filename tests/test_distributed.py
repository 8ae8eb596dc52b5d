"""torchrun with 2 gloo processes (FSDP2, Muon on gathered shards, per-rank experts) logs the losses of 1 process
at the same global batch. Data is pre-packed here with a byte-level encoder (test double for the tokenizer)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from k2lab.train.data import build_dataset
from k2lab.train.metrics import read_metrics
from tests.test_pretrain import FILES, ByteTokenizer

ARGS = ["--data", *FILES, "--seq-len", "32", "--batch-size", "4", "--max-steps", "4", "--warmup-steps", "1",
        "--val-rows", "4", "--eval-every", "2", "--lr", "3e-3", "--qk-clip-tau", "0.22", "--save-every", "2"]


def _torchrun(n, run_dir, *extra):
    build_dataset([Path(f) for f in FILES], ByteTokenizer().encode, 8192 - 255, 32, 16, 4, 0, run_dir / "data")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "k2lab.train.pretrain", *ARGS, "--run-dir", str(run_dir), *extra]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return read_metrics(run_dir)


def test_two_gloo_processes_match_one(tmp_path):
    one = _torchrun(1, tmp_path / "one", "--grad-accum", "2")  # the same micro-batches of 2 rows
    two = _torchrun(2, tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["max_logit"] == pytest.approx(a["max_logit"], rel=1e-4)
        assert b["heads_clipped"] == a["heads_clipped"]
        assert ("val_loss" in b) == ("val_loss" in a)
        assert b.get("val_loss", 0.0) == pytest.approx(a.get("val_loss", 0.0), rel=1e-5)
    assert sum(map(sum, (r["heads_clipped"] for r in two))) > 0  # QK-Clip acted on the sharded weights
    assert (tmp_path / "two" / "checkpoints" / "step-000004" / "optimizer.pt").exists()
