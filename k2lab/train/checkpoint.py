"""Training checkpoints: the model in the Hugging Face layout (k2lab.save_model) plus the optimizer,
the trainer state (step, data position) and every RNG, written with k2lab.runs.atomic_dir, so a checkpoint
directory either is complete or does not exist."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

import k2lab
from k2lab.checkpoint import CheckpointError
from k2lab.runs import atomic_dir

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
TOKENIZER_FILES = ("tiktoken.model", "tokenizer.json", "tokenizer_config.json")  # what Tokenizer.save writes


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


def save_checkpoint(run_dir: Path, step: int, model_for_save, optimizer_state: dict, trainer_state: dict,
                    tokenizer_dir: Path | None, keep: int = 2) -> Path:
    """Write checkpoints/step-NNNNNN atomically; keep the newest `keep` checkpoints."""
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(final) as tmp:  # a step saved again (a resumed run stopping where it started) is replaced
        k2lab.save_model(model_for_save, tmp)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copy2(tokenizer_dir / name, tmp / name)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer.pt")
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
