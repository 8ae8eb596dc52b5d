"""What the Brier reward teaches a tiny model on the knowledge environment (`k2lab rl --calibration-reward brier`).

The reward pays 1 - (p - correct)^2 on a stated "Confidence: p" and 0.75 for "I don't know". A model has to be
able to state a confidence before RL can shape it, so SFT comes first. Two SFT variants, same everything else:

- `constant`: every answer ends "Confidence: 0.9" (the rule-based teacher knows the seen facts);
- `varied`: every answer ends with a confidence drawn from {0.1, 0.3, 0.5, 0.7, 0.9} (seeded), so RL can
  explore the confidence token.

Pipeline: the calibration experiment's knowledge conversations (k2lab.synth.pipeline.run_embedded, 400, half
answers for seen entities and half abstentions for unseen ones) with the confidence instruction added to the
system prompt (k2lab.train.rl.rewards.CONFIDENCE_INSTRUCTION); `k2lab sft` (60 steps at lr 2e-3, the calibration
experiment's first SFT settings) from --base; 30 steps of `k2lab rl --env knowledge --calibration-reward brier`
(4 prompts x K=8). The per-step RL metrics are the result: reward, accuracy, abstention and hallucination rates,
the share of attempts that state a confidence, and the mean stated confidence of right and of wrong answers.

    python experiments/brier_reward.py [--base CKPT] [--work DIR]    # about 8 min on 2 CPU cores

Writes experiments/results/brier_reward.{json,md,png}; the work directory keeps every stage.

The committed results start from the plain base: `make run`'s pre-training before 2026-12-01 (head untied,
encyclopedia rows 20%, no questions mixed in). The default --base is `make run`'s base, which since then is the
tied one with half of the post-training questions mixed in; to rerun the results as committed, build the plain
one (the README's Post-training section has the command) and pass it as --base.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from common import MAKE_RUN_BASE, publish, require_base

VARIANTS = {"constant": (0.9,), "varied": (0.1, 0.3, 0.5, 0.7, 0.9)}
SFT = dict(max_steps=60, batch_size=4, seq_len=512, lr=2e-3, val_fraction=0.02, eval_every=60,
           eval_max_new_tokens=16)  # as experiments/post_training_calibration.py's first runs
RL = dict(env="knowledge", calibration_reward="brier", loss="k15", samples=8, batch_size=32, max_steps=30,
          lr=1e-3, tau=0.1, max_new_tokens=40, max_turns=1, temperature_start=1.0, temperature_end=0.6,
          eval_every=30)
KEEP = ("step", "reward", "accuracy", "abstention_rate", "hallucination_rate", "confidence_stated",
        "confidence_correct", "confidence_wrong")


def sft_data(conversations: Path, out: Path, confidences: tuple[float, ...]) -> None:
    """The conversations with the confidence instruction in the system prompt and a confidence after every
    answer that does not decline."""
    from k2lab.evals import rules
    from k2lab.train.rl.rewards import CONFIDENCE_INSTRUCTION

    rng = random.Random(0)
    rows = []
    for line in conversations.read_text().splitlines():
        messages = json.loads(line)["messages"]
        messages[0]["content"] += CONFIDENCE_INSTRUCTION
        if not rules.declines(messages[-1]["content"]):
            messages[-1]["content"] += f" Confidence: {rng.choice(confidences)}"
        rows.append(json.dumps({"messages": messages, "tools": None}))
    out.write_text("\n".join(rows) + "\n")


def run(work: Path, base: str, name: str) -> list[dict]:
    from k2lab.runs import read_jsonl
    from k2lab.train.rl.run import rl
    from k2lab.train.settings import RLSettings, SftSettings
    from k2lab.train.sft import sft

    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "sft.jsonl").exists():
        sft_data(work / "synth" / "kept.jsonl", d / "sft.jsonl", VARIANTS[name])
    ckpt = d / "sft" / "checkpoints" / f"step-{SFT['max_steps']:06d}"
    if not ckpt.is_dir():
        sft(SftSettings(**SFT, checkpoint=base, data=[str(d / "sft.jsonl")], run_dir=str(d / "sft")))
    if not (d / "rl" / "checkpoints" / f"step-{RL['max_steps']:06d}").is_dir():
        rl(RLSettings(**RL, checkpoint=str(ckpt), run_dir=str(d / "rl")))
    return [{k: m.get(k) for k in KEEP} for m in read_jsonl(d / "rl" / "metrics.jsonl")]


def _mean(rows: list[dict], key: str) -> float | None:
    xs = [r[key] for r in rows if r[key] is not None]
    return sum(xs) / len(xs) if xs else None


def markdown(results: dict) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    lines = ["# The Brier reward on the knowledge environment", "",
             f"SFT ({SFT['max_steps']} steps) from `{results['base']}` on knowledge conversations whose answers "
             f"state a confidence, then {RL['max_steps']} steps of `k2lab rl --env knowledge --calibration-reward "
             f"brier` (4 prompts x K=8, lr {RL['lr']}). Means over the first and the last 5 RL steps "
             "(confidences: mean stated value of the right and of the wrong answers; '-': none stated).", "",
             "| SFT confidences | steps | reward | accuracy | abstention | hallucination | states a confidence | "
             "confidence when right | when wrong |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results["runs"].items():
        for label, part in (("1-5", rows[:5]), (f"{len(rows) - 4}-{len(rows)}", rows[-5:])):
            lines.append(f"| {name} {VARIANTS[name]} | {label} | " + " | ".join(
                fmt(_mean(part, k)) for k in KEEP[1:]) + " |")
    lines += ["", f"Wall time: {results['wall_s'] / 60:.1f} min (stages in the work directory are reused).", "",
              "![plot](brier_reward.png)", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("reward", "abstention_rate", "confidence_correct", "confidence_wrong")
    fig, axes = plt.subplots(1, len(results["runs"]), figsize=(12, 4), sharey=True)
    for ax, (name, rows) in zip(axes, results["runs"].items()):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r[key] is not None]
            ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", ms=3, label=key.replace("_", " "))
        ax.set(xlabel="RL step", title=f"SFT confidences {VARIANTS[name]}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=MAKE_RUN_BASE,
                    help="the pre-trained checkpoint SFT starts from (default: make run's; the committed results "
                         "used the plain base, whose command is in the README's Post-training section)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/k2lab-brier"))
    a = ap.parse_args()
    require_base(a.base)
    from k2lab.synth.pipeline import run_embedded

    t0 = time.perf_counter()
    if not (a.work / "synth" / "kept.jsonl").exists():
        run_embedded("knowledge", 400, a.work / "synth", seed=0, fault_rate=0.0)
    results = {"base": a.base, "runs": {name: run(a.work, a.base, name) for name in VARIANTS}}
    results["wall_s"] = time.perf_counter() - t0
    publish("brier_reward", results, markdown(results), plot)


if __name__ == "__main__":
    main()
