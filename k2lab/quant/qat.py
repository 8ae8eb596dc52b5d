"""Weight-only INT4 QAT for the routed experts, and the `k2lab qat` / `k2lab quantize` entry points.

QAT swaps each `Experts` for `QATExperts`, whose `weights()` fake-quantizes with a straight-through estimator:
the forward sees exactly the INT4 weights the export will write, the optimizer updates full-precision latent
weights. Everything else trains in full precision. The export quantizes the latent weights with the same
rule, so the INT4 checkpoint computes what QAT trained.

Training data: k2lab's data stage is not on main yet, so `k2lab qat` continues training on the byte-level
(ids 0-255) Python standard-library source that ships with every Python, split by file into train and
validation. It is a stand-in for the pre-training / SFT data and says so in the run's metrics.
"""

from __future__ import annotations

import json
import math
import os
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import k2lab
from k2lab.model import Experts, K2ForCausalLM, MoE
from k2lab.quant import int4
from k2lab.quant.checkpoint import is_int4_checkpoint, quantize_experts_


class QATExperts(Experts):
    """Routed experts whose forward uses fake-quantized INT4 weights (gradients straight through)."""

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(int4.fake_quantize(w) for w in (self.gate_proj, self.up_proj, self.down_proj))


def enable_qat_(model: K2ForCausalLM) -> K2ForCausalLM:
    """Switch every routed `Experts` to `QATExperts` in place, keeping the same parameter objects."""
    for moe in model.modules():
        if isinstance(moe, MoE) and type(moe.experts) is Experts:
            old = moe.experts
            with torch.device("meta"):
                new = QATExperts(old.n_experts, old.gate_proj.shape[2], old.gate_proj.shape[1])
            new.gate_proj, new.up_proj, new.down_proj = old.gate_proj, old.up_proj, old.down_proj
            moe.experts = new
    return model


# ---- data: byte-level stdlib source (stand-in until k2lab.data lands) ------------------------------------------
def stdlib_corpus(split: str, max_bytes: int = 4_000_000) -> torch.Tensor:
    """Bytes of the stdlib's .py files, every 10th file held out for validation: uint8 -> int64 ids [N]."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    chosen = [f for i, f in enumerate(files) if (i % 10 == 0) == (split == "val")]
    data, size = [], 0
    for f in chosen:
        b = f.read_bytes()
        data.append(b)
        size += len(b)
        if size >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(data)[:max_bytes]), dtype=torch.uint8).long()


def sample_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([data[s:s + seq_len + 1] for s in start.tolist()])


def lm_loss(model: K2ForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


@torch.no_grad()
def val_loss(model: K2ForCausalLM, data: torch.Tensor, batches: int = 8, batch: int = 8, seq_len: int = 256) -> float:
    gen = torch.Generator().manual_seed(1234)  # the same held-out windows for every model
    return sum(lm_loss(model, sample_batch(data, batch, seq_len, gen)).item() for _ in range(batches)) / batches


def train(model: K2ForCausalLM, steps: int, lr: float, batch: int = 8, seq_len: int = 256, seed: int = 0,
          log=None, start: int = 0, optimizer: torch.optim.Optimizer | None = None,
          data: torch.Tensor | None = None, desc: str = "train", cosine: bool = False,
          loss_fn=lm_loss) -> torch.optim.Optimizer:
    """AdamW on byte-level stdlib text: 20 warmup steps, then constant lr or (cosine) decay to lr/10.
    `loss_fn(model, tokens)` is the objective; `log(step, loss)` runs after each step."""
    data = stdlib_corpus("train") if data is None else data
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed + start)
    model.train()
    for step in tqdm(range(start, steps), desc=desc, initial=start, total=steps):
        decay = 0.55 + 0.45 * math.cos(math.pi * step / steps) if cosine else 1.0
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * decay
        loss = loss_fn(model, sample_batch(data, batch, seq_len, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log:
            log(step + 1, loss.item())
    model.eval()
    return opt


# ---- CLI entry points ----------------------------------------------------------------------------------------
def _load_full_precision(checkpoint: str | Path) -> K2ForCausalLM:
    if is_int4_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is already INT4; QAT and PTQ start from a full-precision checkpoint")
    return k2lab.load_model(checkpoint, dtype=torch.float32)


def quantize(checkpoint: str | Path, out: str | Path) -> Path:
    """PTQ: full-precision checkpoint -> compressed-tensors INT4 checkpoint (routed experts only)."""
    model = quantize_experts_(_load_full_precision(checkpoint))
    return k2lab.save_model(model, out)


def qat(checkpoint: str | Path, run_dir: str | Path, max_steps: int, lr: float = 3e-4, batch: int = 8,
        seq_len: int = 256, save_every: int = 50) -> Path:
    """Continue training `checkpoint` with INT4 fake quantization in the routed experts; write the INT4 export
    to RUN_DIR/checkpoint. Resumes from RUN_DIR/qat_state.pt."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_file = run_dir / "qat_state.pt"
    model = enable_qat_(_load_full_precision(checkpoint))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    start = 0
    if state_file.exists():
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    data = stdlib_corpus("train")
    metrics = open(run_dir / "metrics.jsonl", "a")

    def log(step: int, loss: float) -> None:
        metrics.write(json.dumps({"step": step, "loss": loss, "qat": True, "data": "stdlib-bytes"}) + "\n")
        if step % save_every == 0 or step == max_steps:
            metrics.flush()
            tmp = state_file.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, state_file)

    train(model, max_steps, lr, batch, seq_len, start=start, optimizer=opt, data=data, log=log, desc="qat")
    metrics.close()
    val = val_loss(model, stdlib_corpus("val"), batch=batch, seq_len=seq_len)
    (run_dir / "report.md").write_text(f"# QAT\n\nfrom {checkpoint}, {max_steps} steps, lr {lr}\n\n"
                                       f"validation loss (fake-quantized INT4 experts): {val:.4f}\n")
    return k2lab.save_model(quantize_experts_(model), run_dir / "checkpoint")
