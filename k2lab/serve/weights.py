"""Weights reloaded into a running server, for RL: SGLang's `POST /update_weights_from_disk`.

The trainer saves its policy to a checkpoint directory between steps and asks the server to load it; the
engine's model is updated in place (same tensors, so a compiled decoder keeps its buffers) while no forward
runs (the engine's `weights_lock`). Requests in flight are not lost: they continue under the new weights from
their next token on (SGLang's num_paused_requests counts them), or are aborted first with
`abort_all_requests`. A checkpoint whose tensors differ in name or shape from the served model is refused and
the served weights stay as they were.
"""

from __future__ import annotations

from pathlib import Path

import torch


def update_weights_from_disk(engine, model_path: str, abort_all_requests: bool = False) -> tuple[bool, str, int]:
    """(success, message, requests that were running during the swap) for the engine's model."""
    from k2lab import load_model
    from k2lab.checkpoint import CheckpointError

    path = Path(model_path)
    if not (path / "config.json").is_file():
        return False, f"model_path {model_path}: not a checkpoint directory (no config.json)", 0
    model = engine.model
    try:
        new = load_model(path, device=str(model.device), dtype=model.dtype)
    except (CheckpointError, ValueError, OSError) as e:
        return False, f"model_path {model_path}: {e}", 0
    target, source = model.state_dict(), new.state_dict()
    differ = sorted(k for k in set(target) | set(source)
                    if k not in target or k not in source or target[k].shape != source[k].shape)
    if differ:
        return False, (f"model_path {model_path} does not fit the served model: {len(differ)} tensors differ in "
                       f"name or shape (first: {differ[0]})"), 0
    if abort_all_requests:
        with engine.lock:
            for req in list(engine.waiting) + engine.running:
                req.cancel()
    with engine.weights_lock, torch.no_grad():
        paused = sum(not r.cancelled for r in engine.running)
        for name, tensor in source.items():
            target[name].copy_(tensor)
    return True, f"loaded {model_path}", paused
