"""PTQ vs QAT for INT4 routed experts on `tiny`: validation loss and greedy agreement over 512-token generations.

Claim under test (K2-Thinking): weight-only QAT recovers nearly all of what post-training quantization loses,
and long generations are where PTQ fails.

1. Train `tiny` in full precision (FP) with AdamW (k2lab.train.loop.train, the loop `k2lab qat` runs) on random
   byte windows of the Python stdlib's top-level source files (vocab cut to 512: the data are bytes).
2. From FP: (a) PTQ -> INT4; (b) QAT for a short budget -> INT4; (c) the same budget without fake quantization
   (FP+, a control for "QAT just trained longer"), and its PTQ.
3. Every INT4 model goes through the released format (save -> k2lab.load_model) and decodes with the packed
   INT4 experts. Report validation loss and, for greedy 512-token continuations of held-out prompts, the
   per-position agreement with FP and where each generation first diverges.

    python experiments/int4_qat.py            # ~10-20 min on 1 CPU core; writes experiments/results/int4_qat.*
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import k2lab  # noqa: E402
from k2lab.config import ModelConfig  # noqa: E402
from k2lab.model import K2ForCausalLM  # noqa: E402
from k2lab.quant.checkpoint import quantize_experts_  # noqa: E402
from k2lab.quant.qat import enable_qat_  # noqa: E402
from k2lab.train.loop import token_losses, train  # noqa: E402
from k2lab.train.metrics import read_metrics  # noqa: E402
from k2lab.train.settings import TrainSettings  # noqa: E402
from k2lab.train.sft import distill_losses  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def stdlib_corpus(split: str, max_bytes: int = 4_000_000) -> torch.Tensor:
    """Bytes of the stdlib's top-level .py files, every 10th file held out for validation: ids [N]."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chosen = [f for i, f in enumerate(files) if (i % 10 == 0) == (split == "val")]
    data, size = [], 0
    for f in chosen:
        data.append(f.read_bytes())
        size += len(data[-1])
        if size >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(data)[:max_bytes]), dtype=torch.uint8).long()


def sample_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([data[s:s + seq_len + 1] for s in start.tolist()])


def windows(data: torch.Tensor, args, seed: int):
    """Random training windows, a fixed sequence per seed: step -> tokens [B, T+1]."""
    gen = torch.Generator().manual_seed(seed)
    return lambda step: sample_batch(data, args.batch, args.seq_len, gen)


@torch.no_grad()
def val_loss(model, data: torch.Tensor, batches: int = 8, batch: int = 8, seq_len: int = 256) -> float:
    gen = torch.Generator().manual_seed(1234)  # the same held-out windows for every model
    return sum(token_losses(model, sample_batch(data, batch, seq_len, gen)).mean().item()
               for _ in range(batches)) / batches


def tiny_bytes() -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=512, bos_token_id=256, eos_token_id=257,
                               pad_token_id=511)


def through_format(model, workdir: Path, name: str):
    """Quantize a copy, write it as a compressed-tensors checkpoint and load it back (INT4 experts)."""
    k2lab.save_model(quantize_experts_(copy.deepcopy(model)), workdir / name)
    return k2lab.load_model(workdir / name)


@torch.no_grad()
def generate(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompts, new_tokens)[:, prompts.shape[1]:]


@torch.no_grad()
def kl(ref, model, data: torch.Tensor, args) -> float:
    """Teacher-forced KL(ref || model) per next-byte prediction on held-out windows (nats)."""
    gen, total = torch.Generator().manual_seed(99), 0.0
    for _ in range(4):
        tokens = sample_batch(data, args.batch, args.seq_len, gen)[:, :-1]
        p, q = (F.log_softmax(m(tokens).float(), -1).flatten(0, 1) for m in (ref, model))
        total += F.kl_div(q, p, log_target=True, reduction="batchmean").item() / 4
    return total


def agreement(gen: torch.Tensor, ref: torch.Tensor) -> dict:
    same = (gen == ref).float()
    diverged = (gen != ref).int().cumsum(1) > 0
    first = torch.where(diverged.any(1), diverged.int().argmax(1), torch.full_like(diverged[:, 0], gen.shape[1], dtype=torch.long))
    buckets = {f"{a}-{a + 64}": same[:, a:a + 64].mean().item() for a in range(0, gen.shape[1], 64)}
    return {"token_agreement": same.mean().item(), "per_position": same.mean(0).tolist(),
            "agreement_by_64": buckets, "first_divergence": first.tolist(),
            "mean_first_divergence": first.float().mean().item(),
            "exact_prefix_fraction": (~diverged).float().mean(0).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-steps", type=int, default=400)
    ap.add_argument("--qat-steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--qat-lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared CPU (no OpenMP spinning)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train_data, val_data = stdlib_corpus("train"), stdlib_corpus("val")
    torch.manual_seed(0)
    fp = K2ForCausalLM(tiny_bytes())
    fp.init_weights(seed=0)
    curves = {}
    runs_tmp = tempfile.TemporaryDirectory(prefix="int4_qat_runs.")  # the runs' checkpoints and metrics
    runs = Path(runs_tmp.name)

    def fit(name, model, steps, lr, seed, loss_fn=token_losses, schedule="wsd"):
        """The project's training loop (AdamW, default warm-up) on `model` in place; its loss curve is kept."""
        s = TrainSettings(batch_size=args.batch, max_steps=steps, schedule=schedule, lr=lr, optimizer="adamw",
                          eval_every=steps)
        batches = windows(train_data, args, seed)
        train(s, runs / name, lambda: model, lambda step: {"tokens": batches(step)}, loss_fn=loss_fn, desc=name)
        curves[name] = [(r["step"], r["loss"]) for r in read_metrics(runs / name)]

    fit("fp", fp, args.base_steps, args.lr, 0, schedule="cosine")
    fp.requires_grad_(False)

    distill = functools.partial(distill_losses, fp)  # KL(FP teacher || student) per next-byte position: [B, T]

    continued = {}
    for name, qat_on, loss_fn in [("qat", True, token_losses), ("qat-kd", True, distill), ("fp+", False, token_losses)]:
        model = copy.deepcopy(fp).requires_grad_(True)
        model = enable_qat_(model) if qat_on else model
        fit(name, model, args.qat_steps, args.qat_lr, 1, loss_fn=loss_fn)
        continued[name] = model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"fp": fp, "ptq": through_format(fp, tmp, "ptq"),
                  "qat": through_format(continued["qat"], tmp, "qat"),
                  "qat-kd": through_format(continued["qat-kd"], tmp, "qat_kd"), "fp+": continued["fp+"],
                  "ptq(fp+)": through_format(continued["fp+"], tmp, "ptq_plus")}
        gen = torch.Generator().manual_seed(7)
        starts = torch.randint(0, len(val_data) - 65, (args.prompts,), generator=gen).tolist()
        prompts = torch.stack([val_data[s:s + 64] for s in starts])
        results = {"config": {**vars(args), "out": str(args.out), "model": "tiny, vocab 512 (byte-level)",
                              "data": "Python stdlib .py source, bytes; every 10th file held out"}}
        gens = {}
        for name, model in models.items():
            t = time.time()
            gens[name] = generate(model, prompts, args.new_tokens)
            results[name] = {"generate_s": time.time() - t,
                             "val_loss": val_loss(model, val_data, batch=args.batch, seq_len=args.seq_len)}
            print(f"{name}: val loss {results[name]['val_loss']:.4f}", flush=True)
        pairs = [("ptq", "fp"), ("qat", "fp"), ("qat-kd", "fp"), ("fp+", "fp"), ("qat", "fp+"), ("ptq(fp+)", "fp+")]
        for name, ref in pairs:
            results[name][f"vs_{ref}"] = agreement(gens[name], gens[ref])
            results[name][f"vs_{ref}"]["kl_per_token"] = kl(models[ref], models[name], val_data, args)
    results["train_curves"] = curves
    results["seconds"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    tmp_json = args.out / "int4_qat.json.tmp"
    tmp_json.write_text(json.dumps(results, indent=1))
    os.replace(tmp_json, args.out / "int4_qat.json")
    plot(results, args.out / "int4_qat.png")
    for name in models:
        line = f"{name:9s} val {results[name]['val_loss']:.4f}"
        for key in ("vs_fp", "vs_fp+"):
            if key in results[name]:
                a = results[name][key]
                line += (f"  {key}: agree {a['token_agreement']:.3f}, first divergence "
                         f"{a['mean_first_divergence']:.0f}, KL {a['kl_per_token']:.5f}")
        print(line)


def plot(results: dict, file: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, style in [("ptq", "r-"), ("qat", "g--"), ("qat-kd", "g-"), ("fp+", "k:")]:
        a = results[name]["vs_fp"]
        axes[0].plot(a["exact_prefix_fraction"], style, label=name)
        axes[1].plot(list(a["agreement_by_64"].values()), style + "o", label=name)
    axes[0].set(title="generations still identical to FP (greedy)", xlabel="generated token", ylabel="fraction")
    axes[1].set(title="token agreement with FP per 64-token window", xlabel="window (x64 tokens)")
    names = ["fp", "ptq", "qat", "qat-kd", "fp+", "ptq(fp+)"]
    axes[2].bar(names, [results[n]["val_loss"] for n in names], color=["k", "r", "lightgreen", "g", "grey", "salmon"])
    lo = min(results[n]["val_loss"] for n in names)
    axes[2].set(title="validation loss (bytes)", ylim=(lo * 0.97, max(results[n]["val_loss"] for n in names) * 1.01))
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=110)


if __name__ == "__main__":
    main()
