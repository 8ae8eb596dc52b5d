"""The one training loop: pre-training, QAT, and the coming SFT and RL run through `train`.

A caller gives the settings, a run directory, a model factory, a batch source `batches(step)` and a per-token
loss. One optimizer step: for each micro-batch, forward (MLA layers record their max logits, MoE layers their
expert loads), the per-token loss averaged over the loss mask, backward; clip the gradient norm; Muon/AdamW step
at the scheduled lr; QK-Clip from the step's max logits; aux-loss-free router-bias update from the step's loads;
log. QAT (`qat=True`) trains with fake-quantized INT4 routed experts (k2lab.quant.qat), on any of these runs.

A run resumes exactly: a step's batch is a function of the step, a checkpoint holds the weights, the optimizer
state and every RNG, and metrics logged after the last checkpoint are dropped and logged again.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from k2lab.optim.balance import moe_layers, sequence_aux_loss, update_bias_
from k2lab.optim.muon import build_optimizer
from k2lab.optim.qk_clip import mla_layers, qk_clip_, track_max_logits
from k2lab.optim.schedules import lr_factor
from k2lab.quant.qat import enable_qat_
from k2lab.runs import RunDirError
from k2lab.train import distributed as dist_utils
from k2lab.train.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint, set_rng_state
from k2lab.train.metrics import MetricsLog, plot_run
from k2lab.train.settings import TrainSettings


def token_losses(model, tokens: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy per position: tokens [B, T+1] -> losses [B, T] (fp32), through the model's
    chunked head (model.loss: no [B, T, vocab] logits). document_ids [B, T+1] (packed rows, SFT) keep attention
    and positions within each document. As the training loss, `train` takes the same head's mean directly."""
    return _head_loss(model, tokens, None, None, document_ids, token_gradients=True)[1]


def _head_loss(model, tokens, mask, normalizer, document_ids=None, token_gradients=False):
    docs = None if document_ids is None else document_ids[:, :-1]
    return model.loss(tokens[:, :-1], tokens[:, 1:], mask, document_ids=docs, normalizer=normalizer,
                      token_gradients=token_gradients)


def _extras(batch: dict) -> dict:
    """The batch's per-row tensors other than tokens and the loss mask: keyword arguments of the loss."""
    return {k: v for k, v in batch.items() if k not in ("tokens", "loss_mask", "metrics")}


def _mask(batch: dict) -> torch.Tensor:
    tokens = batch["tokens"]
    mask = batch.get("loss_mask")
    return torch.ones(tokens.shape[0], tokens.shape[1] - 1, device=tokens.device) if mask is None else mask.float()


@torch.no_grad()
def evaluate(model, batch: dict, micro: int, loss_fn=token_losses) -> float:
    """Mean per-token loss over the mask of `batch` ({"tokens": [N, T+1], optional "loss_mask": [N, T]})."""
    was_training = model.training
    model.eval()
    mask, extras = _mask(batch), _extras(batch)
    total = sum((loss_fn(model, batch["tokens"][i:i + micro], **{k: v[i:i + micro] for k, v in extras.items()})
                 * mask[i:i + micro]).sum().item() for i in range(0, len(mask), micro))
    model.train(was_training)
    return total / max(mask.sum().item(), 1.0)


def completed_steps(run_dir: Path) -> int:
    """The step of the run's last checkpoint (0 for a new run)."""
    ckpts = checkpoint_dirs(run_dir)
    return int(ckpts[-1].name.removeprefix("step-")) if ckpts else 0


def check_unfinished(run_dir: Path, max_steps: int) -> None:
    done = completed_steps(run_dir)
    if done >= max_steps:
        raise RunDirError(f"{run_dir} already finished at step {done}; pass a larger --max-steps to continue "
                          f"or another --run-dir")


class RouterScores:
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


def train(s: TrainSettings, run_dir: Path, init_model: Callable[[], torch.nn.Module],
          batches: Callable[[int], dict], *, loss_fn=token_losses, val: dict | None = None,
          evals: Callable[[torch.nn.Module], dict] | None = None, tokenizer_dir: Path | None = None,
          desc: str = "train", on_model: Callable | None = None) -> dict:
    """Train (or resume) the run in `run_dir`; returns the last step's metrics.

    init_model() builds the starting model of a new run (the RNG is seeded with s.seed first); a run with a
    checkpoint resumes from it instead. batches(step) gives the step's global batch: {"tokens": [B, T+1],
    optional "loss_mask": [B, T], and any other per-row tensors}; loss_fn(model, tokens, **others) the per-token
    losses [b, T] of a micro-batch (the other tensors, e.g. SFT's document_ids, are passed by name), or a 0-dim
    tensor: the micro-batch's own mean loss (sequence-level RL losses), and the step's loss is then the mean over
    micro-batches. A 0-dim loss may come as (loss, {name: 0-dim tensor}): parts of it (RL's PTX cross-entropy),
    logged as the loss is, the mean over micro-batches and ranks, without a second forward. A batch's "metrics"
    entry (a dict of numbers, not per-row) is added to the step's record.
    val: a held-out batch of the same form, evaluated every s.eval_every steps; evals(model): more metrics at those
    steps (SFT's tool-call eval). tokenizer_dir is copied into each checkpoint. on_model(model) is called once with
    the model being trained (new or resumed) before the first step, for callers whose batches come from the
    policy itself (RL rollouts).
    """
    s.check()
    check_unfinished(run_dir, s.max_steps)
    rank, world, device = dist_utils.setup()
    if s.batch_size % (world * s.grad_accum):
        raise ValueError(f"batch_size {s.batch_size} is not divisible by world size {world} x grad_accum")
    micro = s.batch_size // (world * s.grad_accum)
    ckpts = checkpoint_dirs(run_dir)
    start, opt_state = 0, None
    if ckpts:
        model, opt_state, state = load_checkpoint(ckpts[-1])
        start = state["step"]
        set_rng_state(state["rng"])
    else:
        torch.manual_seed(s.seed)
        model = init_model()
    config = model.config
    if s.qat:
        enable_qat_(model)
    model.to(device).train()
    if on_model is not None:
        on_model(model)
    track_max_logits(model)
    aux = RouterScores(model) if s.aux_loss_alpha > 0 else None
    model = dist_utils.shard(model, world)  # (FSDP runs model.loss like forward: see dist_utils.shard)
    opt = build_optimizer(model, kind=s.optimizer, lr=s.lr, weight_decay=s.weight_decay)
    if opt_state is not None:
        dist_utils.load_optimizer_state(model, opt, opt_state)

    log = MetricsLog(run_dir, start) if rank == 0 else None
    bar = tqdm(total=s.max_steps, initial=start, desc=desc, unit="step", disable=rank != 0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16)
    tau = s.qk_clip_tau if s.optimizer == "muonclip" else math.inf
    record: dict = {}
    for step in range(start, s.max_steps):
        t0 = time.perf_counter()
        factor = lr_factor(step, schedule=s.schedule, max_steps=s.max_steps, warmup_steps=s.warmup_steps,
                           decay_frac=s.decay_frac)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        batch = batches(step)
        def mine(x: torch.Tensor) -> torch.Tensor:  # this rank's rows, as grad_accum micro-batches
            if len(x) % (world * s.grad_accum):  # rows apart from the batch's (RL's PTX rows) split the same way
                raise ValueError(f"a batch entry of {len(x)} rows does not split into world size {world} x "
                                 f"grad_accum {s.grad_accum} micro-batches")
            return x.view(world, s.grad_accum, -1, *x.shape[1:])[rank].to(device)

        tokens, mask = mine(batch["tokens"]), mine(_mask(batch))
        extras = {k: mine(v) for k, v in _extras(batch).items()}
        # the step's loss is the mean over all its masked tokens, on every rank: ranks hold different counts (SFT's
        # masks) and FSDP averages their gradients, so each divides its sum by (all ranks' tokens / world)
        n_tokens = (dist_utils.sum_over_ranks(mask.sum()) / world).clamp(min=1 / world)
        max_logits = [torch.full((m.n_heads,), -math.inf, device=device) for m in mla_layers(model)]
        loads = [torch.zeros(m.experts.n_experts, device=device) for m in moe_layers(model)]
        loss_sum = torch.zeros((), device=device)
        part_sums: dict[str, torch.Tensor] = {}
        for j, (mb, mb_mask) in enumerate(zip(tokens, mask)):
            with autocast:
                if loss_fn is token_losses:  # the chunked head computes its gradients in the forward: 3 matmuls
                    loss = _head_loss(model, mb, mb_mask, n_tokens, **{k: v[j] for k, v in extras.items()})[0]
                else:
                    losses = loss_fn(model, mb, **{k: v[j] for k, v in extras.items()})
                    if isinstance(losses, tuple):
                        losses, parts = losses
                        for name, v in parts.items():
                            part_sums[name] = part_sums.get(name, 0) + v.detach().float() / s.grad_accum
                    loss = losses / s.grad_accum if losses.dim() == 0 else (losses * mb_mask).sum() / n_tokens
            loss_sum += loss.detach()
            if aux is not None:
                loss = loss + aux.loss(mb.shape[0], s.aux_loss_alpha) / s.grad_accum
            loss.backward()
            for acc, mla in zip(max_logits, mla_layers(model)):
                torch.maximum(acc, mla.max_logits, out=acc)
            for acc, moe in zip(loads, moe_layers(model)):
                acc += moe.last_load
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clip_stats = qk_clip_(model, tau, max_logits)
        imbalance = update_bias_(model, s.bias_update_speed, loads)
        loss_val = dist_utils.mean_over_ranks(loss_sum)
        elapsed = time.perf_counter() - t0
        tokens_seen = batch["tokens"][:, 1:].numel()
        done = step + 1
        record = {"step": done, "tokens": done * tokens_seen, "loss": loss_val, "lr": s.lr * factor,
                  "grad_norm": float(getattr(grad_norm, "full_tensor", lambda: grad_norm)()),
                  "max_logit": [c["max_logit"] for c in clip_stats],
                  "heads_clipped": [c["heads_clipped"] for c in clip_stats],
                  "imbalance": imbalance, "tokens_per_s": tokens_seen / elapsed, **batch.get("metrics", {}),
                  **{name: dist_utils.mean_over_ranks(v) for name, v in part_sums.items()}}
        if val is not None and (done % s.eval_every == 0 or done == s.max_steps):
            record["val_loss"] = evaluate(model, {k: v.to(device) for k, v in val.items()}, micro * s.grad_accum,
                                          loss_fn)
        if evals is not None and (done % s.eval_every == 0 or done == s.max_steps):
            record.update(evals(model))
        if log is not None:
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}", max_logit=f"{max(record['max_logit'], default=0):.1f}",
                        tok_s=f"{record['tokens_per_s']:.0f}")
        if (s.save_every and done % s.save_every == 0) or done == s.max_steps:
            model_for_save, optim_state = dist_utils.gather_for_save(model, opt, config)
            if rank == 0:
                save_checkpoint(run_dir, done, model_for_save, optim_state, {"step": done}, tokenizer_dir)
            dist_utils.barrier()
    bar.close()
    if log is not None:
        log.close()
        plot_run(run_dir)
    return record
