"""`k2lab rl`: RL on the embedded environments with the one training loop (k2lab.train.loop).

Each optimizer step: deal the step's tasks (a function of (seed, step)), play K episodes of each with the
current weights (in process, or on a server: k2lab.train.rl.rollouts; under torchrun each rank plays its
share) at the step's temperature (cosine
decay), score them, lay the trajectories out as tensors and take one update with the chosen loss (k15 default,
k25, grpo), the sampling log-probs as the old policy's. The policy's log-probs in the loss are those of the
sampled distribution (logits / temperature), so on-policy the log-ratio is 0 up to numerics.

A step's rollouts are a pure function of (seed, step, weights) and the weights after step s are in the step-s
checkpoint, so a run killed and rerun logs the same metrics (the loop's resume). Metrics per step: reward and
its components, accuracy, abstention and hallucination rates (knowledge), response length, truncated share,
entropy, the share of groups with all-equal rewards, log-ratio statistics, policy version, temperature; with
the Brier reward the share of attempted answers that state a confidence and the mean confidence of the correct
and of the wrong ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import torch

from k2lab.config import ModelConfig
from k2lab.runs import append_jsonl, atomic_path, claim
from k2lab.train import distributed as dist_utils
from k2lab.train.loop import check_unfinished, token_losses, train
from k2lab.train.rl import rewards
from k2lab.train.rl.critic import add_critic_reward
from k2lab.train.rl.losses import LOSSES, all_equal_share, entropy, log_ratio_stats
from k2lab.train.rl.rollouts import Rollouts, staleness
from k2lab.train.rl.trajectory import collate
from k2lab.train.settings import RLSettings
from k2lab.train.sft import Packed, batches_from, load_packed, pack, read_conversations, render


def policy_logprobs(model, tokens: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """log pi(tokens[:, t+1] | ..t) under the sampled distribution softmax(logits / T): [B, T] float32."""
    logits = model(tokens[:, :-1]).float() / temperature[:, None, None]
    return logits.log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def policy_stats(model, tokens: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                 temperature: float) -> dict:
    """The log-ratio statistics to the sampler and the mean entropy of softmax(logits / T) over the sampled
    (masked) tokens [B, T] of tokens [B, T+1]. The head and its softmax run at those positions only: they are a few
    of each row's tokens, and over every position the [B, T, vocab] head cost as much as the model body (RL's
    statistics took 55 of `make run`'s 310-s RL stage, 2026-12-01)."""
    lm = getattr(model, "language_model", model)  # a K2.5/K2.6 checkpoint: its K2ForCausalLM
    sel = mask.bool()
    h = lm.model(tokens[:, :-1].to(lm.device))[sel.to(lm.device)]
    logp_all = (lm.lm_head(h).float().cpu() / temperature).log_softmax(-1)  # [sampled tokens, vocab]
    logp = torch.zeros(mask.shape)
    logp[sel] = logp_all.gather(-1, tokens[:, 1:][sel][:, None]).squeeze(-1)
    return {**log_ratio_stats(logp, old_logprobs, mask),
            "entropy": entropy(logp_all[None], torch.ones(1, len(logp_all)))}


def ptx_loss(model, tokens: torch.Tensor, mask: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked (assistant) tokens of packed curated conversations."""
    return (token_losses(model, tokens, document_ids) * mask).sum() / mask.sum().clamp(min=1)


def rl_loss(model, tokens, sampled, old_logprobs, rewards, temperature, *, loss: str, k: int, tau: float,
            ptx_weight: float = 0.0, ptx_tokens=None, ptx_mask=None, ptx_document_ids=None):
    """The micro-batch's loss (whole groups of K rows): a 0-dim tensor, as the loop takes for sequence losses.
    With PTX rows in the batch, plus ptx_weight times their cross-entropy, which also comes back as the loop's
    logged part "ptx_loss" (the loss and the metric from one forward)."""
    logp = policy_logprobs(model, tokens, temperature)
    kw = {} if loss == "grpo" else {"tau": tau}
    out = LOSSES[loss](logp, old_logprobs, sampled, rewards, k, **kw)
    if ptx_tokens is None:
        return out
    ptx = ptx_loss(model, ptx_tokens, ptx_mask, ptx_document_ids)
    return out + ptx_weight * ptx, {"ptx_loss": ptx}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def rollout_metrics(trajs, grades, k: int) -> dict:
    r = torch.tensor([t.reward for t in trajs])
    out = {"reward": float(r.mean()), "all_equal_groups": all_equal_share(r, k),
           "response_tokens": _mean([t.sampled_tokens for t in trajs]),
           "accuracy": _mean([g["grade"] == "correct" for g in grades])}
    for name in sorted({c for t in trajs for c in t.rewards}):
        out[f"reward_{name}"] = _mean([t.rewards[name] for t in trajs if name in t.rewards])
    calib = [g["grade"] for g in grades if g["domain"] == "knowledge"]
    if calib:
        wrong, abstained = calib.count("wrong"), calib.count("abstained")
        out["abstention_rate"] = abstained / len(calib)
        out["hallucination_rate"] = wrong / (wrong + abstained) if wrong + abstained else 0.0
    stated = [g for g in grades if "confidence" in g]  # Brier reward: how the stated confidences track grades
    if stated:
        out["confidence_stated"] = _mean([g["confidence"] is not None for g in stated if g["grade"] != "abstained"])
        for grade in ("correct", "wrong"):
            out[f"confidence_{grade}"] = _mean([g["confidence"] for g in stated
                                                if g["grade"] == grade and g["confidence"] is not None])
    return out


def _check_checkpoint(path: str) -> Path:
    d = Path(path)
    missing = [f for f in ("config.json", "tiktoken.model") if not (d / f).is_file()]
    if missing:
        raise ValueError(f"--checkpoint {path}: no {' or '.join(missing)} there; give a checkpoint directory "
                         f"with its tokenizer (as pretrain writes under RUN_DIR/checkpoints/)")
    return d


def prepare_ptx(s: RLSettings, tokenizer, run_dir: Path) -> Packed | None:
    """The PTX set packed into rows (None when off): read and checked from --ptx-data on a new run, kept in
    RUN_DIR/data/ptx.pt so a resumed run trains on exactly the rows it started with."""
    if not s.ptx_data:
        return None
    path = run_dir / "data" / "ptx.pt"
    if path.exists():
        return load_packed(path)
    conversations = read_conversations([s.ptx_data])
    if not conversations:
        raise ValueError(f"--ptx-data {s.ptx_data}: no conversation; give chat JSONL of curated conversations")
    return pack(render(tokenizer, conversations), s.ptx_seq_len, tokenizer.pad_id)


def critic_rewards(s: RLSettings, trajs, grades) -> None:
    """Add the self-critique rubric reward (each group's pairwise win rates) to every trajectory."""
    from k2lab.agents.llm import LLM

    async def go():
        async with LLM(base_url=s.critic_url, model=s.critic_model or None) as llm:
            await add_critic_reward(llm, trajs, grades, s.samples, s.critic_weight)
    asyncio.run(go())


def rl(s: RLSettings) -> dict:
    """Train (or resume) the RL run in s.run_dir; returns the last step's metrics."""
    import k2lab
    from k2lab.tokenizer import Tokenizer

    s.check()
    ckpt = _check_checkpoint(s.checkpoint)
    config = ModelConfig.load(ckpt)
    tokenizer = Tokenizer.load(ckpt)
    run_dir = Path(s.run_dir)
    ptx = prepare_ptx(s, tokenizer, run_dir)  # input errors surface before the run directory is claimed
    rollouts = Rollouts(s, tokenizer, config.max_position_embeddings, run_dir)  # torchrun: joins the group
    rank0 = dist_utils.rank() == 0
    if rank0:
        claim(run_dir, s.identity(config), "rl", inputs=("data",), added=s.ADDED)
    dist_utils.barrier()
    check_unfinished(run_dir, s.max_steps)
    if rank0 and ptx is not None and not (run_dir / "data" / "ptx.pt").exists():
        with atomic_path(run_dir / "data" / "ptx.pt") as tmp:
            torch.save(dataclasses.asdict(ptx), tmp)
    ptx_batches = batches_from(ptx, s.ptx_rows or s.batch_size, s.seed) if ptx is not None else None
    pad = config.pad_token_id if config.pad_token_id is not None else 0

    def batches(step: int) -> dict:
        temp = rewards.temperature(step, s.max_steps, s.temperature_start, s.temperature_end)
        timings: dict = {}
        trajs, grades, model = rollouts.play(step, temp, timings)  # model: the current policy, unsharded
        if s.critic_url:
            t0 = time.perf_counter()
            critic_rewards(s, trajs, grades)
            timings["reward_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        b = collate(trajs, s.samples, pad)
        temperature = torch.full((len(trajs),), temp)
        out = {"tokens": b.input_ids, "loss_mask": b.mask, "sampled": b.mask, "old_logprobs": b.old_logprobs,
               "rewards": b.rewards, "temperature": temperature}
        # the policy before this update: log-ratio to the sampler, entropy
        metrics = {**rollout_metrics(trajs, grades, s.samples), **policy_stats(model, b.input_ids, b.old_logprobs,
                                                                                b.mask, temp),
                   "policy_version": min(t.policy_version for t in trajs), **staleness(trajs, step),
                   "temperature": temp}
        if ptx_batches is not None:
            p = ptx_batches(step)
            out.update(ptx_tokens=p["tokens"], ptx_mask=p["loss_mask"], ptx_document_ids=p["document_ids"])
        timings["stats_s"] = time.perf_counter() - t0
        if rank0:  # wall-clock seconds stay out of metrics.jsonl, which a resumed run reproduces exactly
            append_jsonl(run_dir / "timings.jsonl", {"step": step + 1, **timings})
        return out | {"metrics": metrics}

    def loss_fn(model, tokens, **batch):
        return rl_loss(model, tokens, **batch, loss=s.loss, k=s.samples, tau=s.tau, ptx_weight=s.ptx_weight)

    return train(s, run_dir, lambda: k2lab.load_model(str(ckpt), dtype=torch.float32), batches, loss_fn=loss_fn,
                 tokenizer_dir=ckpt, desc=f"rl-{s.loss}", on_model=rollouts.attach)


def main(argv: list[str] | None = None) -> None:
    """Entry point for torchrun: `torchrun --nproc-per-node N -m k2lab.train.rl.run --checkpoint DIR ...` (flags
    are the RLSettings fields)."""
    dist_utils.run_main(RLSettings, rl, "python -m k2lab.train.rl.run", argv)


if __name__ == "__main__":
    main()

