"""Muon vs AdamW on `tiny` at equal token budgets, each with a small learning-rate sweep: held-out loss against
tokens, and the tokens each needs to reach the same loss (the best final loss of the weaker optimizer).

Both use the K2 parameter groups (k2lab.optim.build_optimizer): "muon" puts hidden matrices and expert stacks
on Muon with 0.2*sqrt(max(A,B)) RMS matching, so the same lr grid is meaningful for both.

    python experiments/muon_vs_adamw.py      # -> experiments/results/muon_vs_adamw.{png,json}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import fresh_run_dir, prepare  # noqa: E402

from k2lab.train.metrics import read_metrics  # noqa: E402
from k2lab.train.pretrain import PretrainSettings, pretrain  # noqa: E402

STEPS, SEQ, BATCH, EVAL_EVERY = 60, 64, 8, 10
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
WORK = Path("runs/exp_muon_vs_adamw")
OUT = Path(__file__).parent / "results"


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First token count where the held-out loss is <= target, interpolated linearly between evaluations."""
    prev = None
    for tokens, loss in curve:
        if loss <= target:
            if prev is None:
                return float(tokens)
            (t0, l0) = prev
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        prev = (tokens, loss)
    return None


def main() -> None:
    torch.set_num_threads(1)  # on 2 shared cores, 2 threads contend with other jobs and run ~15x slower
    tokenizer = prepare(WORK, "tiny", SEQ, STEPS * BATCH, 16)
    curves: dict[str, dict[float, list[tuple[int, float]]]] = {"muon": {}, "adamw": {}}
    for kind in curves:
        for lr in LRS:
            run_dir = fresh_run_dir(WORK, f"{kind}-{lr:g}")
            pretrain(PretrainSettings(run_dir=str(run_dir), optimizer=kind, seq_len=SEQ, batch_size=BATCH,
                                      max_steps=STEPS, warmup_steps=5, lr=lr, val_rows=16, eval_every=EVAL_EVERY))
            curves[kind][lr] = [(r["tokens"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]
    best = {kind: min(runs, key=lambda lr: runs[lr][-1][1]) for kind, runs in curves.items()}
    target = max(curves[k][best[k]][-1][1] for k in curves)  # the loss both best runs reach
    need = {k: tokens_to_reach(curves[k][best[k]], target) for k in curves}
    summary = {
        "steps": STEPS, "tokens_per_step": SEQ * BATCH, "tokenizer": tokenizer, "lrs": LRS,
        "final_val_loss": {k: {f"{lr:g}": c[-1][1] for lr, c in runs.items()} for k, runs in curves.items()},
        "best_lr": {k: best[k] for k in curves}, "target_val_loss": target, "tokens_to_target": need,
        "adamw_over_muon_tokens": need["adamw"] / need["muon"] if need["muon"] and need["adamw"] else None,
        "curves": {k: {f"{lr:g}": c for lr, c in runs.items()} for k, runs in curves.items()},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "muon_vs_adamw.json").write_text(json.dumps(summary, indent=1))
    plot(curves, best, target)
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, indent=1))


def plot(curves, best, target) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"muon": "tab:blue", "adamw": "tab:orange"}
    for kind, runs in curves.items():
        for lr, c in runs.items():
            ax.plot([t for t, _ in c], [v for _, v in c], color=colors[kind], lw=2.2 if lr == best[kind] else 0.9,
                    alpha=1.0 if lr == best[kind] else 0.5, marker="o", ms=3, label=f"{kind} lr {lr:g}")
    ax.axhline(target, color="k", ls="--", lw=0.8, label="target (weaker best final)")
    ax.set(xlabel="training tokens", ylabel="held-out loss", title="tiny: Muon vs AdamW (bold: best lr)")
    ax.legend(fontsize=7)
    fig.savefig(OUT / "muon_vs_adamw.png", dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
