"""In-context copying probe: does the model predict a span better the second time it reads it?

A model with induction heads (Olsson et al., 2022) copies from its context: after reading a span once, its loss on
a repetition of that span falls close to 0. A model without them predicts the repetition no better than the first
occurrence. Copying is what held-out tool names (declared in the prompt, named in the call), the values of a
request and tool results in an agent's answer all need, so this probe explains when those fail.

`copy_probe(model, rows, span)`: for each held-out row, its first `span` tokens are read twice in a row; the mean
next-token loss (nats) over the first reading and over the second (the first token of each reading excluded: it
cannot be predicted from what comes before), and the share of each reading's tokens that the greedy prediction
gets right (on the second reading: the copied token).
"""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def copy_probe(model, rows: torch.Tensor, span: int = 64) -> dict:
    """rows [N, >= span] token ids (held-out text) -> {"first_nll", "repeat_nll", "first_top1", "repeat_top1",
    "rows", "span"}."""
    if rows.dim() != 2 or rows.shape[1] < span or span < 2 or len(rows) == 0:
        raise ValueError(f"need token rows [N >= 1, >= {span}] and span >= 2, got {tuple(rows.shape)}, span {span}")
    seq = rows[:, :span].long()
    x = torch.cat([seq, seq], dim=1)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        out = model(x)
    finally:
        if was_training:
            model.train()
    logits = (out.logits if hasattr(out, "logits") else out).float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")  # [N, 2S-1]
    # position p predicts token p + 1: the first reading's tokens 1..S-1, the second's S+1..2S-1
    first, repeat = nll[:, : span - 1], nll[:, span:]
    hit = (logits[:, :-1].argmax(-1) == x[:, 1:]).float()
    return {"first_nll": first.mean().item(), "repeat_nll": repeat.mean().item(),
            "first_top1": hit[:, : span - 1].mean().item(), "repeat_top1": hit[:, span:].mean().item(),
            "rows": len(rows), "span": span}


def probe_checkpoint(checkpoint: str | Path, val_rows: str | Path, rows: int = 16, span: int = 64) -> dict:
    """copy_probe of the model in `checkpoint` (fp32) on the first `rows` rows of a pre-training run's held-out
    token rows (`data/val.npy`)."""
    import numpy as np

    import k2lab

    return copy_probe(k2lab.load_model(checkpoint, dtype=torch.float32), torch.from_numpy(np.load(val_rows))[:rows],
                      span)
