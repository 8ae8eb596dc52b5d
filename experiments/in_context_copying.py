"""Why the tiny model could not call a held-out tool: it did not copy from its context; what copy training taught it.

Calling a tool by the name declared in the prompt, or carrying a request's numbers into a call, is copying from
the context, which transformers do with induction heads (Olsson et al., 2022). This experiment measures it:

1. The copying probe (k2lab.evals.copying) on pre-trained bases (`--base`, one or more, e.g. make run's): the loss
   on a held-out 64-token span read the second time vs the first. A copier drops near 0.
2. Pure copy training from scratch: every row is a random 64-token sequence repeated four times, with tokens drawn
   from an alphabet of `--alphabets` sizes (the same `tiny` model, MuonClip, the pre-training loop). The held-out
   loss of a model that copies perfectly is ln(alphabet) / 4 (only the first reading is unpredictable); one that
   does not stays at ln(alphabet). This shows whether the architecture and loop can form induction heads at all,
   and how much harder a large alphabet (the tokenizer's whole vocabulary) makes it.
3. A curriculum: the model that learned to copy over the smallest alphabet, trained on the largest for as many
   steps. If the copying circuit it formed were token-agnostic, the large-alphabet loss would fall at once.
4. Untied vs tied: the largest alphabet for `--long-steps` with K2's untied output head, and with the head tied to
   the input embeddings (`k2lab pretrain --tie-embeddings`). Copying writes out the token it attends to: with one
   matrix in and out that is the same direction for every token, with two random ones the model has to learn
   the map token by token, which the tokens of a large alphabet are each seen too rarely for.
5. What the copying runs learned: each run's last checkpoint reads random spans of its alphabet twice, at
   several lengths (DISTANCES). Induction (match the current token, copy the one after it) copies at every
   length; a head that attends a fixed distance back copies only at the training period, 64. The tied run
   copies at 64 and nowhere else: it learned the period, not induction, so none of these runs shows the tiny
   model learning the copying that held-out tools need.

    python experiments/in_context_copying.py --base runs/demo/pretrain/checkpoints/step-000800

Writes experiments/results/in_context_copying.{json,md,png}. Runs resume (each pure-copy run has its run directory
under --work).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from k2lab.evals.report import md_table  # noqa: E402
from k2lab.runs import read_jsonl  # noqa: E402
from k2lab.train.checkpoint import checkpoint_dirs  # noqa: E402

from common import publish  # noqa: E402

SPAN, REPEATS, FIRST_ID = 64, 4, 300  # token ids from FIRST_ID on: ordinary (non-special) tokens
DISTANCES = (16, 32, 63, 64, 65, 128)  # span lengths of the distance probe (the training period is SPAN)


def copy_rows(n: int, alphabet: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.integers(FIRST_ID, FIRST_ID + alphabet, (n, SPAN))
    return np.concatenate([a] * REPEATS + [a[:, :1]], axis=1).astype(np.int32)  # seq_len 256 + 1


def pure_copy(work: Path, alphabet: int, steps: int, tokenizer: str, init_from: Path | None = None,
              name: str | None = None, tie: bool = False) -> dict:
    from k2lab.train.pretrain import pretrain
    from k2lab.train.settings import PretrainSettings

    run_dir = work / (name or f"copy_{alphabet}")
    start = str(init_from) if init_from else None
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    if not (run_dir / "data" / "train.npy").exists():
        np.save(run_dir / "data" / "val.npy", copy_rows(32, alphabet, 1))
        np.save(run_dir / "data" / "train.npy", copy_rows(steps * 8, alphabet, 0))
    if not any(r.get("step") == steps and "val_loss" in r for r in read_jsonl(run_dir / "metrics.jsonl")):
        pretrain(PretrainSettings(preset="tiny", optimizer="muonclip", qk_clip_tau=15.0, max_steps=steps,
                                  batch_size=8, seq_len=SPAN * REPEATS, lr=3e-3, seed=0, eval_every=25,
                                  save_every=steps, tokenizer=tokenizer, run_dir=str(run_dir),
                                  init_from=start, tie_embeddings=tie))
    records = read_jsonl(run_dir / "metrics.jsonl")
    curve = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    # training time from the logged per-step rate, so a resumed rerun reports the run's time, not its own
    train_s = sum(r["tokens"] / r["step"] / r["tokens_per_s"] for r in records if r.get("tokens_per_s"))
    return {"alphabet": alphabet, "steps": steps, "init_from": start, "tied": tie, "run_dir": str(run_dir),
            "no_copy_loss": math.log(alphabet), "perfect_copy_loss": math.log(alphabet) / REPEATS,
            "val_curve": curve, "final_val_loss": curve[-1][1], "train_seconds": round(train_s, 1)}


def probe(base: Path) -> dict:
    from k2lab.evals.copying import probe_checkpoint

    return {"checkpoint": str(base), **probe_checkpoint(base, base.parent.parent / "data" / "val.npy", 16, SPAN)}


def distance_probe(run_dir: Path, alphabet: int, rows: int = 16) -> dict[str, float]:
    """Top-1 on the second reading of random spans of the run's alphabet, per span length: induction copies at
    every length, a fixed-distance head only at the training period."""
    import k2lab
    from k2lab.evals.copying import copy_probe

    model = k2lab.load_model(checkpoint_dirs(run_dir)[-1], dtype=torch.float32).eval()
    rng = np.random.default_rng(2)
    return {str(n): round(copy_probe(model, torch.from_numpy(rng.integers(FIRST_ID, FIRST_ID + alphabet, (rows, n))),
                                     n)["repeat_top1"], 3) for n in DISTANCES}


def alphabet_sizes(text: str) -> list[int]:
    sizes = [int(a) for a in text.split(",")]  # argparse reports a ValueError as an invalid value
    if min(sizes) < 2:
        raise ValueError(text)
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, nargs="+",
                    help="pre-trained checkpoints inside their run directories (data/val.npy) to probe; the first "
                         "one's tokenizer sets the vocabulary")
    ap.add_argument("--alphabets", default=[100, 7600], type=alphabet_sizes,
                    help="pure-copy alphabet sizes, comma-separated (default 100,7600)")
    ap.add_argument("--steps", type=int, default=200, help="steps of each pure-copy run (default 200)")
    ap.add_argument("--long-steps", type=int, default=600,
                    help="steps of the untied and tied runs over the largest alphabet (default 600; 0: skip them)")
    ap.add_argument("--work", default="runs/experiments/in_context_copying")
    args = ap.parse_args()
    bases = [Path(b) for b in args.base]
    for base in bases:
        if not (base / "config.json").is_file() or not (base.parent.parent / "data" / "val.npy").is_file():
            sys.exit(f"--base {base}: not a checkpoint of a pre-training run (needs config.json and "
                     f"../../data/val.npy)")
    alphabets, work, tok = args.alphabets, Path(args.work), str(bases[0])
    runs = [pure_copy(work, a, args.steps, tok) for a in alphabets]
    # the curriculum: the model that learned to copy over the smallest alphabet, trained on the largest
    small, large = min(alphabets), max(alphabets)
    if small < large:
        warm = checkpoint_dirs(Path(runs[alphabets.index(small)]["run_dir"]))[-1]
        runs.append(pure_copy(work, large, args.steps, tok, init_from=warm, name=f"copy_{small}_then_{large}"))
    long = [pure_copy(work, large, args.long_steps, tok, name=f"copy_{large}_{kind}_{args.long_steps}",
                      tie=kind == "tied") for kind in ("untied", "tied")] if args.long_steps else []
    for r in runs + long:
        r["distance_probe"] = distance_probe(Path(r["run_dir"]), r["alphabet"])
    out = {"probes": [probe(b) for b in bases], "pure_copy": runs, "untied_vs_tied": long,
           "torch_threads": torch.get_num_threads()}
    publish("in_context_copying", out, report(out), plot)


def plot(o: dict, path: Path) -> None:
    from k2lab.evals.report import plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in o["pure_copy"] + o["untied_vs_tied"]:
        label = (f"alphabet {r['alphabet']}, {'tied' if r['tied'] else 'untied'} head" if r in o["untied_vs_tied"]
                 else f"alphabet {_run_label(r)}")
        ax.plot(*zip(*r["val_curve"]), marker=".", label=label)
        ax.axhline(r["perfect_copy_loss"], color="grey", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title("pure copy training (dotted: perfect copying)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run_label(r: dict) -> str:
    return (f"{r['alphabet']}" + (", tied" if r.get("tied") else "")
            + (f" after {Path(r['init_from']).parent.parent.name}" if r.get("init_from") else ""))


def _curve_table(runs: list[dict], every: int) -> str:
    steps = [s for s, _ in runs[0]["val_curve"] if s % every == 0]
    headers = ["alphabet", "no copying ln(a)", "perfect copying ln(a)/4", *(f"step {s}" for s in steps),
               "training s"]
    rows = [[_run_label(r), f"{r['no_copy_loss']:.2f}", f"{r['perfect_copy_loss']:.2f}",
             *(f"{v:.2f}" for s, v in r["val_curve"] if s % every == 0), str(r["train_seconds"])] for r in runs]
    return md_table(headers, rows)


def report(o: dict) -> str:
    lines = ["# In-context copying: the tiny model does not learn it here; tied, it learns a fixed-distance copy", ""]
    for p in o["probes"]:
        lines.append(f"Probe of `{p['checkpoint']}` ({p['rows']} held-out spans of {p['span']} tokens read twice): "
                     f"loss {p['first_nll']:.2f} nats the first time, {p['repeat_nll']:.2f} the second; tokens "
                     f"predicted exactly {p['first_top1']:.0%} then {p['repeat_top1']:.0%}. A model that copies "
                     f"drops near 0.")
        lines.append("")
    lines += ["Pure copy training from scratch (`tiny`, MuonClip lr 3e-3, 8 rows of a 64-token sequence x 4 a step; "
              "held-out loss, nats):", "", _curve_table(o["pure_copy"], 25)]
    widened = [r for r in o["pure_copy"] if r.get("init_from")]
    if widened:
        w = widened[0]
        moved = w["val_curve"][0][1] - w["final_val_loss"]
        lines += ["", f"Curriculum: after learning to copy over the small alphabet, {w['steps']} steps over "
                      f"{w['alphabet']} tokens moved the held-out loss by {moved:.2f} nats (no copying: "
                      f"{w['no_copy_loss']:.2f}, perfect: {w['perfect_copy_loss']:.2f}), so the circuit did "
                      + ("not transfer." if w["final_val_loss"] > 0.9 * w["no_copy_loss"] else "transfer.")]
    if o["untied_vs_tied"]:
        lines += ["", "Untied (K2's layout) vs tied output head over the whole vocabulary, longer:", "",
                  _curve_table(o["untied_vs_tied"], 100), ""]
        for r in o["untied_vs_tied"]:
            learned = r["final_val_loss"] < (r["no_copy_loss"] + r["perfect_copy_loss"]) / 2
            lines.append(f"- {'tied' if r['tied'] else 'untied'}: {r['val_curve'][0][1]:.2f} -> "
                         f"{r['final_val_loss']:.2f} nats in {r['steps']} steps: "
                         + ("copies its training rows." if learned else "did not learn to copy."))
    probed = [r for r in o["pure_copy"] + o["untied_vs_tied"] if "distance_probe" in r]
    if probed:
        lines += ["", "What was learned: random spans of the run's alphabet read twice, top-1 on the second reading, "
                      "by span length (the training rows repeat every 64 tokens; induction would copy at every "
                      "length, a head that attends a fixed distance back only at 64):", "",
                  md_table(["run", *(f"span {n}" for n in DISTANCES)],
                           [[_run_label(r) + (f", {r['steps']} steps" if r in o["untied_vs_tied"] else ""),
                             *(f"{r['distance_probe'][str(n)]:.0%}" for n in DISTANCES)] for r in probed])]
        fixed = [r for r in probed if r["distance_probe"][str(SPAN)] > 0.5
                 and max(v for n, v in r["distance_probe"].items() if int(n) != SPAN) < 0.1]
        if fixed:
            lines += ["", "Copies at 64 and nowhere else: " + ", ".join(_run_label(r) for r in fixed) + ". These "
                      "runs learned the period of their data, not induction."]
    lines += ["", "![](in_context_copying.png)", "", f"torch threads {o['torch_threads']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
