"""RL throughput of `k2lab rl` on the tiny model: rollout tokens/s, optimizer steps/minute, and the share of a
step's wall time spent in rollout, reward, the pre-update statistics pass and the update.

    python bench/rl.py [--checkpoint DIR] [--env mental] [--steps 6] [--batch-size 16] [--samples 4]

It runs the real command (k2lab.train.rl.run.rl, the one training loop) and reads what the run records, not a
copy of the loop: the loop's per-step `tokens_per_s` in metrics.jsonl gives the step's wall time (the step's
tokens / tokens_per_s), and the RL code's timings.jsonl splits it: sampling (`generate_s`), environment steps
(`env_s`; rollout = both), scoring (`reward_s`), the no-grad pass for log-ratio and entropy (`stats_s`); the
update (forward, backward, optimizer, QK-Clip) is the rest. Medians over steps, the first (warm-up) left out.
Writes bench/results/rl.json and rl.md; the load average is recorded (a shared machine: absolute rates are noisy).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from k2lab.runs import read_jsonl, write_atomic, write_json
from k2lab.train.rl.run import rl
from k2lab.train.settings import RLSettings

RESULTS = Path(__file__).parent / "results"
PARTS = ("rollout", "reward", "stats", "update")


def step_rows(run_dir: Path, batch_size: int) -> list[dict]:
    """Per step: wall seconds of the step and of each part, and the tokens the policy sampled."""
    timings = {t["step"]: t for t in read_jsonl(run_dir / "timings.jsonl")}
    rows = []
    for m in read_jsonl(run_dir / "metrics.jsonl"):
        t = timings[m["step"]]
        step_s = m["tokens"] / m["step"] / m["tokens_per_s"]  # the loop's own clock over the whole step
        parts = {"rollout": t["generate_s"] + t["env_s"], "reward": t["reward_s"], "stats": t["stats_s"]}
        parts["update"] = step_s - sum(parts.values())
        rows.append({"step": m["step"], "step_s": step_s, "generate_s": t["generate_s"], **{f"{k}_s": v for k, v in
                     parts.items()}, "sampled_tokens": m["response_tokens"] * batch_size})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/demo1/pretrain/checkpoints/step-000300")
    ap.add_argument("--env", default="mental")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    a = ap.parse_args()
    load_before = os.getloadavg()
    run_dir = Path(tempfile.mkdtemp(prefix="k2lab-bench-rl-"))
    try:
        rl(RLSettings(checkpoint=a.checkpoint, run_dir=str(run_dir / "run"), env=a.env, batch_size=a.batch_size,
                      samples=a.samples, max_new_tokens=a.max_new_tokens, max_turns=1, max_steps=a.steps,
                      warmup_steps=1))
        rows = step_rows(run_dir / "run", a.batch_size)[1:]  # the first step warms up
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    load_after = os.getloadavg()

    med = {k: statistics.median(r[k] for r in rows) for k in ("step_s", *(f"{p}_s" for p in PARTS))}
    share = {p: med[f"{p}_s"] / sum(med[f"{q}_s"] for q in PARTS) for p in PARTS}
    rollout_tps = statistics.median(r["sampled_tokens"] / r["generate_s"] for r in rows)
    result = {"checkpoint": a.checkpoint, "env": a.env, "steps": a.steps, "batch_size": a.batch_size,
              "samples": a.samples, "max_new_tokens": a.max_new_tokens, "rollout_tokens_per_s": rollout_tps,
              "optimizer_steps_per_minute": 60 / med["step_s"], "median_seconds": med, "share_of_step": share,
              "per_step": rows, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average_1_5_15": {"before": load_before, "after": load_after},
              "note": "shared, loaded CPU (see load average): absolute rates are noisy; shares are of the same steps"}
    table = [f"`k2lab rl --env {a.env}` on the tiny model ({a.checkpoint}), {a.batch_size} rollouts per step "
             f"(K={a.samples}), up to {a.max_new_tokens} new tokens, {torch.get_num_threads()} thread(s), load "
             f"average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs; medians of steps "
             f"2..{a.steps}",
             "", f"- rollout: {rollout_tps:,.1f} sampled tokens/s",
             f"- optimizer steps/minute: {60 / med['step_s']:.2f} (median step {med['step_s']:.2f} s)", "",
             "| part of a step | median s | share |", "|---|---:|---:|"]
    table += [f"| {p} | {med[f'{p}_s']:.3f} | {share[p]:.1%} |" for p in PARTS]
    print("\n".join(table))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "rl.json", result)
    write_atomic(RESULTS / "rl.md", "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
