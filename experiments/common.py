"""Shared by the experiments: one packed dataset for every pre-training run, copied into each run directory, so
all runs of an experiment see the same rows in the same order; and `publish`, which writes an experiment's
results files."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable

from k2lab.config import ModelConfig
from k2lab.runs import write_atomic, write_json
from k2lab.train.data import build_dataset, embedded_corpus


def encoder(work: Path, vocab_size: int):
    """(tokenizer, description): the project's BPE tokenizer trained once on the embedded corpus."""
    from k2lab.tokenizer import Tokenizer, train_tokenizer

    out = work / "tokenizer"
    if not out.is_dir():
        train_tokenizer(vocab_size, paths=None, out_dir=out)
    return Tokenizer.load(out), f"k2lab.tokenizer BPE, vocab {vocab_size}, trained on the embedded corpus"


def prepare(work: Path, preset: str, seq_len: int, rows: int, val_rows: int, seed: int = 0) -> str:
    """Pack the embedded corpus once into work/data; returns the tokenizer's description."""
    config = ModelConfig.preset(preset)
    enc, name = encoder(work, config.vocab_size)
    if not (work / "data" / "train.npy").exists():
        build_dataset(embedded_corpus(), enc.encode, config.eos_token_id, seq_len, rows, val_rows, seed,
                      work / "data")
    return name


def fresh_run_dir(work: Path, name: str) -> Path:
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(work / "data", run_dir / "data")
    if (work / "tokenizer").is_dir():
        shutil.copytree(work / "tokenizer", run_dir / "tokenizer")
    return run_dir


RESULTS = Path(__file__).resolve().parent / "results"
# make run's pre-trained model (since 2026-12-01 the tied one with half of the post-training questions mixed in;
# results committed before then name the plain base they used in their experiment's docstring)
MAKE_RUN_BASE = "runs/demo/pretrain/checkpoints/step-000800"


def require_base(base: str, option: str = "--base",
                 hint: str = "run `make run` first or pass a pre-trained checkpoint") -> None:
    """Exit with one line unless `base` (given as `option`) is a checkpoint directory; `hint` says how to get one."""
    if not (Path(base) / "config.json").is_file():
        root = Path(__file__).resolve().parents[1]
        where = ("" if Path(base).is_absolute() or Path.cwd().resolve() == root
                 else f" (relative to {Path.cwd()}; the repository root is {root})")
        sys.exit(f"{option} {base}: no checkpoint there{where}; {hint}")


def publish(name: str, results, report: str, plot: Callable | None = None, out: Path = RESULTS) -> None:
    """out/{name}.json (the results), out/{name}.md (the report, also printed) and, with `plot(results, path)`,
    out/{name}.png; each file written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", results)
    write_atomic(out / f"{name}.md", report)
    if plot is not None:
        plot(results, out / f"{name}.png")
    print(report)
