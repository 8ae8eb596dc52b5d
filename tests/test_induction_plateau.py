"""experiments/induction_plateau.py runs its loop, widens its alphabet on cue and refuses bad options in one line
(a few steps of the tiny model; the experiment's findings are in the README, not asserted here)."""

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "induction_plateau.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_curriculum_widens_when_the_current_alphabet_is_copied():
    # --widen-at 0.0001: any copied token moves it on (at 8 tokens, chance alone copies some)
    r = _run("--alphabet", "8", "16", "--zipf", "1", "--steps", "3", "--every", "1", "--batch-size", "2",
             "--seq-len", "24", "--widen-at", "0.0001")
    assert r.returncode == 0, r.stderr
    steps = re.findall(r"^step (\d+) alphabet (\d+) loss ([\d.]+)", r.stdout, re.M)
    assert [(s, n) for s, n, _ in steps] == [("1", "8"), ("2", "16"), ("3", "16")], r.stdout
    assert "step 1: widening to an alphabet of 16" in r.stdout


def test_bad_options_get_one_line():
    for args, words in [(("--alphabet", "64", "8"), "increasing order"),
                        (("--alphabet", "64", "64"), "increasing order"), (("--alphabet", "9000",), "whole vocabulary"),
                        (("--zipf", "-1"), "--zipf"), (("--widen-at", "0"), "--widen-at"),
                        (("--kv-lora-rank", "0"), "--kv-lora-rank"), (("--span", "5", "2"), "--span")]:
        r = _run(*args)
        assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
