"""Run observability: metrics.jsonl (one JSON object per step or evaluation), TensorBoard events, PNG plots."""

from __future__ import annotations

import statistics
from pathlib import Path

from k2lab.runs import append_jsonl, read_jsonl, rewrite_jsonl


class MetricsLog:
    """Appends records to run_dir/metrics.jsonl and TensorBoard; on resume drops records after the checkpoint,
    so a resumed run logs each step exactly once."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        records = read_jsonl(self.path)
        kept = [r for r in records if r["step"] <= resume_step]
        if len(kept) < len(records):  # records written after the checkpoint belong to steps that will be redone
            rewrite_jsonl(self.path, kept)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        append_jsonl(self.path, record)
        step = record["step"]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, list):
                for i, v in enumerate(value):
                    self.tb.add_scalar(f"{key}/layer{i}", v, step)
            elif isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Each value averaged with the up to window - 1 values before it."""
    return [statistics.fmean(values[max(0, j - window + 1):j + 1]) for j in range(len(values))]


def plot_run(run_dir: Path) -> list[Path]:
    """plots/{loss,max_logit,heads_clipped,expert_load}.png from metrics.jsonl, and for RL runs rewards.png
    (reward, accuracy, abstention and hallucination rates, stated confidences per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    def per_layer(key: str, title: str, name: str) -> None:
        rows = [r for r in train if r.get(key)]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for i in range(len(rows[0][key])):
            ax.plot([r["step"] for r in rows], [r[key][i] for r in rows], label=f"layer {i}")
        ax.set(xlabel="step", title=title)
        ax.legend(fontsize=7)
        fig.savefig(out_dir / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="held-out")
    ax.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax.legend()
    fig.savefig(out_dir / "loss.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append(out_dir / "loss.png")
    rl_keys = [k for k in ("reward", "accuracy", "abstention_rate", "hallucination_rate", "confidence_correct",
                           "confidence_wrong") if any(r.get(k) is not None for r in train)]
    if "reward" in rl_keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, key in enumerate(rl_keys):
            rows = [r for r in train if r.get(key) is not None]
            steps, values = [r["step"] for r in rows], [r[key] for r in rows]
            window = max(1, len(values) // 20)  # a step's rollouts are few: the trailing mean shows the trend
            ax.plot(steps, values, color=f"C{i}", alpha=0.25)
            ax.plot(steps, trailing_mean(values, window), color=f"C{i}", label=key.replace("_", " "))
        ax.set(xlabel="step", title="RL rollouts per step (faint: each step; bold: trailing mean)")
        ax.legend(fontsize=7)
        fig.savefig(out_dir / "rewards.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(out_dir / "rewards.png")
    per_layer("max_logit", "max attention logit per layer", "max_logit.png")
    per_layer("heads_clipped", "heads clipped by QK-Clip", "heads_clipped.png")
    per_layer("imbalance", "expert load imbalance (max/mean) per MoE layer", "expert_load.png")
    return written
