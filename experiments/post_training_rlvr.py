"""RLVR from an SFT'd tiny model: does RL on verifiable arithmetic raise accuracy above the SFT model, and how do
the K1.5 (default), K2.5 token-level and GRPO-style objectives compare?

Pipeline, all with k2lab's own commands as functions:
1. SFT data: the rule-based solver's answers to `mental` tasks (short arithmetic questions, no tools: "What is
   7 + 5?" -> "12"), written as chat JSONL (what `k2lab synth` writes for the tool domains).
2. `k2lab sft` from the tiny pre-trained checkpoint, deliberately short (a weak start leaves room for RL).
3. `k2lab rl --env mental` from the SFT checkpoint, once per objective and seed, same settings otherwise
   (--batch rollouts per step as --batch/8 prompts x K=8); the reward is verifiable (the rules grader: every
   number stated must be the exact value) plus the budget term.
4. Held-out accuracy, greedy, on --heldout tasks from a seed no run trained on (the problem space is small,
   operands 0..12, so "held-out" means a separate draw of problems, not unseen facts), for the SFT model and
   every RL run at its middle and last checkpoint; the gain over SFT with a 95% paired bootstrap interval
   (held-out tasks resampled, each task's RL correctness averaged over the seeds).

    python experiments/post_training_rlvr.py [--base CKPT] [--work DIR] [--seeds 0 1 2] [--steps 160] [--batch 128]

Writes experiments/results/post_training_rlvr.{json,md,png}. The work directory keeps every stage, so a rerun
skips what is done (SFT, finished RL runs).

The committed results start from the plain base: `make run`'s pre-training before 2026-12-01 (head untied,
encyclopedia rows 20%, no questions mixed in). The default --base is `make run`'s base, which since then is the
tied one with half of the post-training questions mixed in; to rerun the results as committed, build the plain
one (the README's Post-training section has the command) and pass it as --base.

`--losses` picks the objectives (default: all three; with --thinking, k15); another set writes results named
after it (post_training_rlvr_k15.*), so it never replaces the committed ones. `--thinking` runs the same
pipeline in K2.6's thinking mode (`k2lab sft --thinking`, `k2lab rl --thinking`, the held-out episodes too):
the prompt ends with `<think>`, the policy samples reasoning, `</think>`, then the answer, all within --budget
new tokens, and the reward reads the answer only. The SFT data has no reasoning (the solver answers at once),
so SFT teaches an empty `<think></think>`; RL may lengthen it if reasoning pays. It writes
experiments/results/post_training_rlvr_thinking.*, with the held-out answers' mean reasoning length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import MAKE_RUN_BASE, publish, require_base

LOSSES = ("k15", "k25", "grpo")


def sft_data(path: Path, n: int) -> None:
    from k2lab.synth import solver
    from k2lab.synth.domains import make_tasks, registry
    from k2lab.synth.env import Environment
    from k2lab.synth.pipeline import episode

    if path.exists():
        return
    d = registry()["mental"]
    rows = []
    for t in make_tasks(["mental"], n, seed=1000):
        record = episode(Environment(d, t), lambda messages, tools, t=t: solver.solve(d, t, messages))
        rows.append(json.dumps({"messages": record["messages"], "tools": None}))
    path.write_text("\n".join(rows) + "\n")


def sft_checkpoint(work: Path, steps: int, base: str, thinking: bool = False) -> Path:
    from k2lab.train.settings import SftSettings
    from k2lab.train.sft import sft

    run_dir = work / ("sft-thinking" if thinking else "sft")
    ckpt = run_dir / "checkpoints" / f"step-{steps:06d}"
    if not ckpt.is_dir():
        sft(SftSettings(checkpoint=base, data=[str(work / "sft.jsonl")], run_dir=str(run_dir), max_steps=steps,
                        save_every=20, eval_every=1000, batch_size=8, seq_len=256, val_fraction=0.02,
                        thinking=thinking))
    return ckpt


@torch.no_grad()
def heldout_episodes(ckpt: Path, n: int, budget: int = 4, thinking: bool = False) -> tuple[list[int], list[int]]:
    """1 / 0 per task, greedy, on n `mental` tasks drawn from a seed no run trains on; and per task the number
    of reasoning tokens sampled before `</think>` (all 0 with thinking off)."""
    import k2lab
    from k2lab.serve.rollout import InProcessGenerator, RolloutParams
    from k2lab.synth.domains import make_tasks
    from k2lab.tokenizer import Tokenizer
    from k2lab.train.rl.episodes import run_episodes

    model = k2lab.load_model(str(ckpt), dtype=torch.float32).eval()
    tok = Tokenizer.load(ckpt)
    gen = InProcessGenerator(model, (tok.im_end_id, tok.eos_id))
    trajectories, grades = run_episodes(gen, tok, make_tasks(["mental"], n, seed=424242), 1,
                                        RolloutParams(max_new_tokens=budget, temperature=0.0), 1,
                                        model.config.max_position_embeddings, 0.0, thinking=thinking)
    end = tok.special_tokens["</think>"]
    reasoning = [(t.completion_ids.index(end) if end in t.completion_ids else len(t.completion_ids)) if thinking
                 else 0 for t in trajectories]
    return [int(g["grade"] == "correct") for g in grades], reasoning


def rl_run(ckpt: Path, run_dir: Path, loss: str, seed: int, steps: int, lr: float, batch: int, budget: int = 4,
           thinking: bool = False) -> list[dict]:
    from k2lab.runs import read_jsonl
    from k2lab.train.rl.run import rl
    from k2lab.train.settings import RLSettings

    done = run_dir / "checkpoints" / f"step-{steps:06d}"
    if not done.is_dir():
        rl(RLSettings(checkpoint=str(ckpt), run_dir=str(run_dir), env="mental", loss=loss, seed=seed,
                      batch_size=batch, samples=8, max_new_tokens=budget, max_turns=1, max_steps=steps, lr=lr,
                      warmup_steps=1, temperature_start=1.0, temperature_end=0.7, save_every=steps // 2,
                      thinking=thinking))
    return read_jsonl(run_dir / "metrics.jsonl")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from k2lab.train.metrics import trailing_mean

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = dict(zip(LOSSES, ("C0", "C1", "C2")))
    window = max(1, results["rl_steps"] // 10)
    for loss, runs in results["runs"].items():
        steps = [m["step"] for m in runs[0]["metrics"]]
        mean = [statistics.mean(r["metrics"][i]["accuracy"] for r in runs) for i in range(len(steps))]
        axes[0].plot(steps, trailing_mean(mean, window), color=colors[loss], label=f"{loss} (mean of seeds)")
        for r in runs:
            at = sorted((int(k), v) for k, v in r["heldout"].items())
            axes[1].plot([0] + [a for a, _ in at], [results["sft_heldout_accuracy"]] + [v for _, v in at],
                         "o-", color=colors[loss], alpha=0.35, lw=1)
        curve = sorted({int(k) for r in runs for k in r["heldout"]})
        axes[1].plot([0] + curve, [results["sft_heldout_accuracy"]]
                     + [statistics.mean(r["heldout"][str(c)] for r in runs) for c in curve],
                     "o-", color=colors[loss], lw=2.5, label=f"{loss} (bold: mean of seeds)")
    axes[0].set(xlabel="RL step", ylabel="accuracy of the step's rollouts (sampled)",
                title=f"RLVR on mental arithmetic: rollouts ({window}-step trailing mean)")
    axes[0].legend()
    axes[1].axhline(results["sft_heldout_accuracy"], color="gray", ls="--", label="SFT start")
    axes[1].set(xlabel="RL step", ylabel=f"held-out accuracy (greedy, {results['heldout_tasks']} tasks)",
                title="held-out accuracy during RL, per seed")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def gain(sft: list[int], runs: list[dict]) -> dict:
    """Mean held-out accuracy of the runs minus the SFT model's, with a 95% paired bootstrap interval: tasks are
    resampled, each task's RL correctness averaged over the runs (seeds)."""
    from k2lab.evals.stats import bootstrap_ci

    diff = np.mean([r["correct"] for r in runs], axis=0) - np.asarray(sft)
    return {"gain": float(diff.mean()), "ci95": list(bootstrap_ci(diff, np.mean))}


def markdown(results: dict) -> str:
    n_prompts = results["batch"] // 8
    thinking = results.get("thinking", False)
    lines = ["# RLVR on verifiable arithmetic from an SFT'd tiny model" + (", thinking on" if thinking else ""), "",
             f"SFT start ({results['sft_steps']} SFT steps from the tiny pre-trained checkpoint): held-out greedy "
             f"accuracy **{results['sft_heldout_accuracy']:.3f}** on {results['heldout_tasks']} tasks.", "",
             "RL: `k2lab rl --env mental" + (" --thinking" if thinking else "") + f"`, {results['rl_steps']} steps "
             f"of {results['batch']} rollouts ({n_prompts} prompts x K=8), lr {results['lr']}, temperature 1.0 -> "
             "0.7, " + (f"{results['budget']} new tokens per answer, " if thinking else "")
             + f"seeds {results['seeds']}.", ""]
    if thinking:
        lines += ["Thinking on: SFT (`k2lab sft --thinking`) on answers without reasoning, so it teaches an empty "
                  "`<think></think>`; RL samples after `<think>`, and the budget counts the reasoning. Mean reasoning "
                  f"tokens of the held-out greedy answers: SFT {results['sft_reasoning_tokens']:.2f}, after RL " +
                  ", ".join(f"{loss} {statistics.mean(r['heldout_reasoning_tokens'] for r in runs):.2f}"
                            for loss, runs in results["runs"].items()) + ".", ""]
    lines += [
             "| objective | held-out accuracy per seed (last step) | mean | gain over SFT [95% CI] | "
             "mean at the middle step | rollout accuracy, first -> last 10% of steps |",
             "|---|---|---|---|---|---|"]
    mid = str(results["rl_steps"] // 2)
    tenth = max(1, results["rl_steps"] // 10)
    for loss, runs in results["runs"].items():
        accs = [r["heldout_accuracy"] for r in runs]
        g = results["gain"][loss]
        first = statistics.mean(m["accuracy"] for r in runs for m in r["metrics"][:tenth])
        last = statistics.mean(m["accuracy"] for r in runs for m in r["metrics"][-tenth:])
        lines.append(f"| {loss} | {', '.join(f'{a:.3f}' for a in accs)} | {statistics.mean(accs):.3f} | "
                     f"{g['gain']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] | "
                     f"{statistics.mean(r['heldout'][mid] for r in runs):.3f} | {first:.3f} -> {last:.3f} |")
    lines += ["", f"Wall time of this invocation: {results['wall_s'] / 60:.1f} min on a shared 2-core CPU machine "
              "(stages already in the work directory are reused, not rerun).", "",
              f"![plot]({results.get('name', 'post_training_rlvr')}.png)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/k2lab-rlvr"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--base", default=MAKE_RUN_BASE,
                    help="the pre-trained checkpoint SFT starts from (default: make run's; the committed results "
                         "used the plain base, whose command is in the README's Post-training section)")
    ap.add_argument("--steps", type=int, default=160, help="RL steps per run (even: held-out accuracy is also "
                                                             "measured at the middle one)")
    ap.add_argument("--batch", type=int, default=128, help="rollouts per RL step (batch / 8 prompts x K=8)")
    ap.add_argument("--lr", type=float, default=1e-4, help="RL learning rate (3e-4 gained less, 5e-4 collapsed "
                                                            "the entropy)")
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--heldout", type=int, default=400, help="held-out tasks")
    ap.add_argument("--losses", default=None, help="objectives to run, comma-separated (default: all three; with "
                                                   "--thinking k15); another set writes results named after it")
    ap.add_argument("--thinking", action="store_true",
                    help="K2.6 thinking mode in SFT, RL and the held-out episodes (writes post_training_rlvr_thinking.*)")
    ap.add_argument("--budget", type=int, default=None,
                    help="new tokens per answer, reasoning included (default: 4, with --thinking 16)")
    a = ap.parse_args()
    default_losses = ["k15"] if a.thinking else list(LOSSES)
    losses = default_losses if a.losses is None else [x.strip() for x in a.losses.split(",") if x.strip()]
    budget = (16 if a.thinking else 4) if a.budget is None else a.budget
    if a.steps < 2 or a.steps % 2 or a.batch < 8 or a.batch % 8:
        sys.exit(f"--steps ({a.steps}) must be even and >= 2, --batch ({a.batch}) a positive multiple of 8")
    if not losses or set(losses) - set(LOSSES):
        sys.exit(f"--losses {a.losses!r}: choose from {', '.join(LOSSES)}, comma-separated")
    if budget < 1:
        sys.exit(f"--budget {budget}: give at least 1 new token per answer")
    t0 = time.perf_counter()
    require_base(a.base)
    a.work.mkdir(parents=True, exist_ok=True)
    sft_data(a.work / "sft.jsonl", 1500)
    ckpt = sft_checkpoint(a.work, a.sft_steps, a.base, a.thinking)
    sft_correct, sft_reasoning = heldout_episodes(ckpt, a.heldout, budget, a.thinking)
    name = "post_training_rlvr" + ("_thinking" if a.thinking else "")  # the committed results' names
    if losses != default_losses:  # a subset (or another order) never replaces them
        name += "_" + "_".join(losses)
    results = {"name": name, "thinking": a.thinking, "budget": budget, "sft_steps": a.sft_steps,
               "rl_steps": a.steps, "batch": a.batch, "lr": a.lr, "seeds": a.seeds, "heldout_tasks": a.heldout,
               "sft_heldout_accuracy": statistics.mean(sft_correct),
               "sft_reasoning_tokens": statistics.mean(sft_reasoning), "runs": {}}
    print(f"SFT held-out accuracy {results['sft_heldout_accuracy']:.3f}", flush=True)
    keep = ("step", "reward", "accuracy", "response_tokens", "entropy", "all_equal_groups", "temperature")
    for seed in a.seeds:  # seed-major: an interrupted experiment has every objective for the seeds it finished
        for loss in losses:
            run_dir = a.work / f"rl-{loss}-s{seed}{'-thinking' if a.thinking else ''}"
            metrics = rl_run(ckpt, run_dir, loss, seed, a.steps, a.lr, a.batch, budget, a.thinking)
            heldout = {str(step): heldout_episodes(run_dir / "checkpoints" / f"step-{step:06d}", a.heldout, budget,
                                                   a.thinking)
                       for step in (a.steps // 2, a.steps)}
            correct, reasoning = heldout[str(a.steps)]
            results["runs"].setdefault(loss, []).append(
                {"seed": seed, "heldout_accuracy": statistics.mean(correct), "correct": correct,
                 "heldout": {k: statistics.mean(v[0]) for k, v in heldout.items()},
                 "heldout_reasoning_tokens": statistics.mean(reasoning),
                 "metrics": [{k: m[k] for k in keep} for m in metrics]})
            print(f"{loss} seed {seed}: held-out accuracy {statistics.mean(correct):.3f}", flush=True)
    results["gain"] = {loss: gain(sft_correct, runs) for loss, runs in results["runs"].items()}
    results["wall_s"] = time.perf_counter() - t0
    publish(name, results, markdown(results), plot)


if __name__ == "__main__":
    main()
