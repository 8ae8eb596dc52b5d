"""Training checkpoints: the model in the Hugging Face layout (k2lab.save_model) plus the optimizer,
the trainer state (step, data position) and every RNG, written into a temporary directory, fsynced and
renamed into place, so a checkpoint directory either is complete or does not exist."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

import k2lab
from k2lab.checkpoint import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)), key=lambda p: p.name)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model_for_save, optimizer_state: dict, trainer_state: dict,
                    tokenizer_dir: Path | None, keep: int = 2) -> Path:
    """Write checkpoints/step-NNNNNN atomically; keep the newest `keep` checkpoints."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    k2lab.save_model(model_for_save, tmp)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer.pt")
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (a resumed run that stops where it started)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_tree(root)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path):
    """(model, optimizer state, trainer state) of a checkpoint; a clear error names what is corrupt."""
    try:
        model = k2lab.load_model(path)
    except (CheckpointError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete: {e}") from None
    states = []
    for name in ("optimizer.pt", "trainer.pt"):
        try:
            states.append(torch.load(path / name, weights_only=False))
        except Exception as e:  # torch.load raises many types on truncated or garbled files
            raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {name} ({e})") from None
    return model, states[0], states[1]
