"""The data and eval sets the recipe uses, one function each, so a better builder replaces one function.

Each takes the run directory and the recipe and returns paths (None: the eval's shipped set). What each one
does not yet do is said in its docstring and repeated in the report (`LIMITS`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from k2lab.pipeline.presets import Recipe
from k2lab.runs import write_atomic

# Where this run's sets fall short of what the recipe wants; the report lists these under "what did not work".
LIMITS: list[str] = []


def _corpus_subset(r: Recipe) -> list[Path]:
    from k2lab.train.data import embedded_corpus

    files = sorted(embedded_corpus())
    random.Random(f"corpus-subset:{r.seed}").shuffle(files)
    chosen, size = [], 0
    for f in files:
        if size >= r.corpus_mb * 1e6:
            break
        chosen.append(f)
        size += f.stat().st_size
    return chosen


def pretrain_data(run_dir: Path, r: Recipe) -> list[Path]:
    """One JSONL file of documents: a seeded subset (r.corpus_mb) of the embedded corpus, one document per file.
    The encyclopedia's articles come in through pre-training's own mix (PretrainSettings.encyclopedia, a share
    of the training rows), not as documents here."""
    path = run_dir / "data" / "pretrain.jsonl"
    if path.exists():
        return [path]
    docs = [f.read_text(encoding="utf-8", errors="replace") for f in _corpus_subset(r)]
    random.Random(f"pretrain-data:{r.seed}").shuffle(docs)
    write_atomic(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return [path]


def tokenizer_data(run_dir: Path, r: Recipe) -> list[Path]:
    """The tokenizer's text files: the encyclopedia's seen entities first, then the embedded corpus (the
    tokenizer reads 256 bytes per vocabulary entry from the start)."""
    from k2lab.data.encyclopedia import corpus_text
    from k2lab.train.data import embedded_corpus

    enc = run_dir / "data" / "encyclopedia.txt"
    if not enc.exists():
        write_atomic(enc, corpus_text())
    return [enc, *sorted(embedded_corpus())]


def sft_data(run_dir: Path, synth_dir: Path, r: Recipe) -> list[Path]:
    """The conversations SFT trains on (and QAT continues on): the synthesis stage's kept trajectories."""
    return [synth_dir / "kept.jsonl"]


def toolcall_eval_set(run_dir: Path, r: Recipe) -> Path:
    """Request bodies over held-out generated tools (k2lab.synth.heldout: tool names, parameter names and nouns
    that no SFT or RL task uses), about 60% expecting a call and the rest a direct answer, greedy."""
    from k2lab.synth.heldout import write_heldout_toolcall_set

    path = run_dir / "data" / "toolcalls.jsonl"
    return path if path.exists() else write_heldout_toolcall_set(path, seed=r.seed + 104729, n=r.toolcall_items,
                                                                   max_tokens=r.eval_max_tokens)


def calibration_eval_set(run_dir: Path, r: Recipe) -> Path:
    """The encyclopedia's held-out questions (k2lab.data.encyclopedia.heldout_calibration_set: entities that no
    SFT or RL question names, about seen ("known") and unseen ("unknown") entities), at most
    r.calibration_items of them, in the calibration eval's format."""
    from k2lab.data.encyclopedia import heldout_calibration_set

    path = run_dir / "data" / "calibration.jsonl"
    if path.exists():
        return path
    rows = heldout_calibration_set()
    rows = random.Random(f"calibration-eval:{r.seed}").sample(rows, min(r.calibration_items, len(rows)))
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def coding_eval_set(run_dir: Path, r: Recipe) -> Path | None:
    """The coding eval's problems (None: the shipped set)."""
    return None


def agent_tasks(r: Recipe, n: int) -> list:
    """n single-turn tasks of the embedded tool domains, from a seed the synthesis stage never used (new
    instances of the same domains: other numbers, items, files)."""
    from k2lab.synth.domains import make_tasks

    tasks = [t for t in make_tasks(["store", "files", "lookup", "arithmetic"], 4 * n, seed=r.seed + 7919)
             if len(t.turns) == 1]
    return tasks[:n]
