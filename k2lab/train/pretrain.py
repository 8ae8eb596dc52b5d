"""Pre-training with MuonClip: `k2lab pretrain` and `torchrun --nproc-per-node N -m k2lab.train.pretrain`.

One optimizer step: for each micro-batch, forward (MLA layers record their max logits, MoE layers their
expert loads), cross-entropy, backward; clip the gradient norm; Muon/AdamW step at the scheduled lr; QK-Clip
from the step's max logits; aux-loss-free router-bias update from the step's loads; log. The run directory
holds run.json (the settings), data/ (packed rows), checkpoints/, metrics.jsonl, tensorboard/, plots/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from k2lab.config import ModelConfig
from k2lab.model import K2ForCausalLM
from k2lab.optim.balance import moe_layers, sequence_aux_loss, update_bias_
from k2lab.optim.muon import build_optimizer
from k2lab.optim.qk_clip import mla_layers, qk_clip_, track_max_logits
from k2lab.optim.schedules import lr_factor
from k2lab.train import distributed as dist_utils
from k2lab.train.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint, set_rng_state
from k2lab.train.data import PackedRows, build_dataset, check_readable, embedded_corpus
from k2lab.train.metrics import MetricsLog, plot_run


@dataclass
class PretrainSettings:
    preset: str = "tiny"
    data: list[str] = field(default_factory=list)  # files or .jsonl; empty: the embedded corpus
    tokenizer: str | None = None  # a tokenizer directory; None: train one into run_dir/tokenizer
    seq_len: int = 128
    batch_size: int = 8  # rows per optimizer step, over all ranks and micro-batches
    grad_accum: int = 1
    max_steps: int = 200
    warmup_steps: int = 20
    schedule: str = "wsd"
    decay_frac: float = 0.2
    lr: float = 3e-3
    weight_decay: float = 0.1
    optimizer: str = "muonclip"
    qk_clip_tau: float = 100.0
    bias_update_speed: float = 1e-3
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss; 0 = aux-loss-free only, as K2
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    val_rows: int = 32
    eval_every: int = 50
    # Run control: may change between a run and its resumption.
    save_every: int = 0
    run_dir: str = "runs/pretrain"

    CONTROL = ("save_every", "run_dir")

    def check(self) -> None:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.optimizer not in ("muonclip", "muon", "adamw"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose muonclip, muon or adamw")
        if self.max_steps < 1 or self.seq_len < 2:
            raise ValueError(f"max_steps ({self.max_steps}) and seq_len ({self.seq_len}) are too small")
        lr_factor(0, schedule=self.schedule, max_steps=self.max_steps, warmup_steps=self.warmup_steps,
                  decay_frac=self.decay_frac)  # raises on bad schedule settings before anything is written

    def identity(self, config: ModelConfig) -> dict:
        """What makes two runs the same run: every setting but run control, and the model config."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.CONTROL}
        return {**d, "model": config.to_dict()}


def _check_run_dir(run_dir: Path, identity: dict) -> None:
    path = run_dir / "run.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); is {run_dir} a k2lab run directory?") from None
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff:
            raise ValueError(f"{run_dir} holds a run with other settings (differing: {', '.join(diff)}); "
                             f"use another --run-dir or the same settings")
    else:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(identity, indent=1))
        os.replace(tmp, path)


def _tokenizer(s: PretrainSettings, run_dir: Path, config: ModelConfig):
    """The run's tokenizer: the one given, the one this run trained before, or a newly trained one."""
    from k2lab.tokenizer import Tokenizer, train_tokenizer

    if s.tokenizer:
        return Tokenizer.load(s.tokenizer)
    out = run_dir / "tokenizer"
    if not out.is_dir():
        paths = [Path(p) for p in s.data] or None
        train_tokenizer(config.vocab_size, paths=paths, out_dir=out)
    return Tokenizer.load(out)


def evaluate(model, rows: torch.Tensor, micro: int) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in rows.split(micro):
            logits = model(chunk[:, :-1])
            total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
    model.train()
    return total / count


class _RouterScores:
    """Forward hooks keeping each router's input so the sequence-wise aux loss can recompute its scores."""

    def __init__(self, model):
        self.inputs: dict[int, torch.Tensor] = {}
        self.routes: dict[int, torch.Tensor] = {}
        self.moes = moe_layers(model)
        for i, moe in enumerate(self.moes):
            moe.gate.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def hook(module, args, out):
            self.inputs[i], self.routes[i] = args[0], out[0]
        return hook

    def loss(self, bsz: int, alpha: float) -> torch.Tensor:
        total = 0.0
        for i, moe in enumerate(self.moes):
            scores = F.linear(self.inputs[i].float(), moe.gate.weight.float()).sigmoid()
            total = total + sequence_aux_loss(scores.view(bsz, -1, scores.shape[-1]),
                                              self.routes[i].view(bsz, -1, self.routes[i].shape[-1]), alpha)
        return total


def pretrain(s: PretrainSettings, tokenizer=None) -> dict:
    """Train (or resume) the run in s.run_dir; returns the last step's metrics.

    tokenizer: an object with `.encode(text) -> list[int]` to use instead of the run's tokenizer (tests).
    """
    s.check()
    rank, world, device = dist_utils.setup()
    config = ModelConfig.preset(s.preset)
    run_dir = Path(s.run_dir)
    if s.batch_size % (world * s.grad_accum):
        raise ValueError(f"batch_size {s.batch_size} is not divisible by world size {world} x grad_accum")
    micro = s.batch_size // (world * s.grad_accum)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _check_run_dir(run_dir, s.identity(config))
    dist_utils.barrier()

    ckpts = checkpoint_dirs(run_dir)
    if rank == 0 and not (run_dir / "data" / "train.npy").exists():
        paths = [Path(p) for p in s.data] or embedded_corpus()
        check_readable(paths)  # before a tokenizer is trained on them
        encoder = tokenizer if tokenizer is not None else _tokenizer(s, run_dir, config)
        build_dataset(paths, encoder.encode, config.eos_token_id, s.seq_len, s.max_steps * s.batch_size,
                      s.val_rows, s.seed, run_dir / "data")
    tok_dir = Path(s.tokenizer) if s.tokenizer else run_dir / "tokenizer"
    tok_dir = tok_dir if tok_dir.is_dir() else None  # copied into each checkpoint (HF layout)
    dist_utils.barrier()
    train_rows = PackedRows(run_dir / "data" / "train.npy", s.seed)
    val_rows = PackedRows(run_dir / "data" / "val.npy", s.seed).rows[: s.val_rows]

    start, opt_state = 0, None
    if ckpts:
        model, opt_state, state = load_checkpoint(ckpts[-1])
        start = state["step"]
        set_rng_state(state["rng"])
    else:
        torch.manual_seed(s.seed)
        model = K2ForCausalLM(config)
        model.init_weights(seed=s.seed)
    model.to(device).train()
    track_max_logits(model)
    aux = _RouterScores(model) if s.aux_loss_alpha > 0 else None
    model = dist_utils.shard(model, world)
    opt = build_optimizer(model, kind=s.optimizer, lr=s.lr, weight_decay=s.weight_decay)
    if opt_state is not None:
        dist_utils.load_optimizer_state(model, opt, opt_state)

    log = MetricsLog(run_dir, start) if rank == 0 else None
    bar = tqdm(total=s.max_steps, initial=start, desc="pretrain", unit="step", disable=rank != 0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16)
    record: dict = {}
    tokens_per_step = s.batch_size * s.seq_len
    for step in range(start, s.max_steps):
        t0 = time.perf_counter()
        factor = lr_factor(step, schedule=s.schedule, max_steps=s.max_steps, warmup_steps=s.warmup_steps,
                           decay_frac=s.decay_frac)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        rows = train_rows.batch(step, s.batch_size).view(world, s.grad_accum, micro, -1)[rank].to(device)
        max_logits = [torch.full((m.n_heads,), -math.inf, device=device) for m in mla_layers(model)]
        loads = [torch.zeros(m.experts.n_experts, device=device) for m in moe_layers(model)]
        loss_sum = torch.zeros((), device=device)
        for mb in rows:
            with autocast:
                logits = model(mb[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), mb[:, 1:].flatten())
            loss_sum += loss.detach()
            if aux is not None:
                loss = loss + aux.loss(mb.shape[0], s.aux_loss_alpha)
            (loss / s.grad_accum).backward()
            for acc, mla in zip(max_logits, mla_layers(model)):
                torch.maximum(acc, mla.max_logits, out=acc)
            for acc, moe in zip(loads, moe_layers(model)):
                acc += moe.last_load
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tau = s.qk_clip_tau if s.optimizer == "muonclip" else math.inf
        clip_stats = qk_clip_(model, tau, max_logits)
        imbalance = update_bias_(model, s.bias_update_speed, loads)
        loss_val = dist_utils.mean_over_ranks(loss_sum / s.grad_accum)
        elapsed = time.perf_counter() - t0
        record = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": loss_val,
                  "lr": s.lr * factor, "grad_norm": float(getattr(grad_norm, "full_tensor", lambda: grad_norm)()),
                  "max_logit": [c["max_logit"] for c in clip_stats],
                  "heads_clipped": [c["heads_clipped"] for c in clip_stats],
                  "imbalance": imbalance, "tokens_per_s": tokens_per_step / elapsed}
        done = step + 1
        if done % s.eval_every == 0 or done == s.max_steps:
            val = evaluate(model, val_rows.to(device), micro * s.grad_accum) if s.val_rows else float("nan")
            record["val_loss"] = val
        if log is not None:
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}", max_logit=f"{max(record['max_logit']):.1f}",
                        tok_s=f"{record['tokens_per_s']:.0f}")
        if (s.save_every and done % s.save_every == 0) or done == s.max_steps:
            model_for_save, optim_state = dist_utils.gather_for_save(model, opt, config)
            if rank == 0:
                save_checkpoint(run_dir, done, model_for_save, optim_state, {"step": done}, tok_dir)
            dist_utils.barrier()
    bar.close()
    if log is not None:
        log.close()
        plot_run(run_dir)
    return record


def main(argv: list[str] | None = None) -> None:
    """Entry point for torchrun: flags are the PretrainSettings fields (--max-steps 10 --run-dir DIR ...)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m k2lab.train.pretrain")
    for f in dataclasses.fields(PretrainSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true")
        elif f.name == "data":
            parser.add_argument(flag, nargs="*", default=[])
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=typ, default=f.default)
    args = parser.parse_args(argv)
    record = pretrain(PretrainSettings(**vars(args)))
    if dist_utils.rank() == 0:
        print(json.dumps(record))
    dist_utils.teardown()


if __name__ == "__main__":
    main()
