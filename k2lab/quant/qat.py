"""Weight-only INT4 QAT for the routed experts, and the `k2lab qat` / `k2lab quantize` entry points.

QAT swaps each `Experts` for `QATExperts`, whose `weights()` fake-quantizes with a straight-through estimator:
the forward sees exactly the INT4 weights the export will write, the optimizer updates full-precision latent
weights. Everything else trains in full precision. The export quantizes the latent weights with the same
rule, so the INT4 checkpoint computes what QAT trained.

Training data: the pre-training pipeline's embedded corpus and packed rows (`k2lab.train.data`), encoded
with the checkpoint's tokenizer (or as bytes when the checkpoint has none). The loop is plain AdamW: QAT
fine-tunes a trained model briefly, it does not need the pre-training optimizer.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import k2lab
from k2lab.model import Experts, K2ForCausalLM, MoE
from k2lab.quant import int4
from k2lab.quant.checkpoint import is_int4_checkpoint, quantize_experts_
from k2lab.tokenizer import Tokenizer
from k2lab.train.data import PackedRows, build_dataset, embedded_corpus


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


def lm_loss(model: K2ForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def train(model: K2ForCausalLM, steps: int, lr: float, batches, *, start: int = 0,
          optimizer: torch.optim.Optimizer | None = None, log=None, cosine: bool = False, loss_fn=lm_loss,
          desc: str = "train") -> torch.optim.Optimizer:
    """AdamW, 20 warmup steps, then constant lr or (cosine) decay to lr/10. `batches(step)` gives the tokens
    [B, T+1] of a step, `loss_fn(model, tokens)` the objective; `log(step, loss)` runs after each step."""
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    for step in tqdm(range(start, steps), desc=desc, initial=start, total=steps):
        decay = 0.55 + 0.45 * math.cos(math.pi * step / steps) if cosine else 1.0
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * decay
        loss = loss_fn(model, batches(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log:
            log(step + 1, loss.item())
    model.eval()
    return opt


@torch.no_grad()
def evaluate(model: K2ForCausalLM, rows: torch.Tensor, micro: int = 8) -> float:
    return sum(lm_loss(model, rows[i:i + micro]).item() * len(rows[i:i + micro])
               for i in range(0, len(rows), micro)) / len(rows)


def qat_data(checkpoint: Path, run_dir: Path, config, seq_len: int, rows: int, val_rows: int = 32):
    """The pre-training data pipeline (embedded corpus, packed rows) encoded with the checkpoint's tokenizer,
    or as bytes for a checkpoint that has none. Built once into RUN_DIR/data; returns (train, val rows)."""
    data_dir = run_dir / "data"
    if not (data_dir / "train.npy").exists():
        if (checkpoint / "tiktoken.model").is_file():
            encode = Tokenizer.load(checkpoint).encode
        elif config.vocab_size > 256:
            encode = lambda text: list(text.encode("utf-8"))  # noqa: E731
        else:
            raise ValueError(f"{checkpoint} has no tokenizer and its vocab ({config.vocab_size}) cannot hold bytes")
        build_dataset(embedded_corpus(), encode, config.eos_token_id, seq_len, rows, val_rows, 0, data_dir)
    return PackedRows(data_dir / "train.npy", 0), PackedRows(data_dir / "val.npy", 0).rows[:val_rows]


# ---- CLI entry points ----------------------------------------------------------------------------------------
def _load_full_precision(checkpoint: str | Path) -> K2ForCausalLM:
    if is_int4_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is already INT4; QAT and PTQ start from a full-precision checkpoint")
    return k2lab.load_model(checkpoint, dtype=torch.float32)


def quantize(checkpoint: str | Path, out: str | Path) -> Path:
    """PTQ: full-precision checkpoint -> compressed-tensors INT4 checkpoint (routed experts only)."""
    model = quantize_experts_(_load_full_precision(checkpoint))
    k2lab.save_model(model, out)
    if (Path(checkpoint) / "tiktoken.model").exists():  # a checkpoint directory carries its tokenizer
        Tokenizer.load(checkpoint).save(out)
    return Path(out)


def qat(checkpoint: str | Path, run_dir: str | Path, max_steps: int, lr: float = 3e-4, batch: int = 8,
        seq_len: int = 256, save_every: int = 50) -> Path:
    """Continue training `checkpoint` with INT4 fake quantization in the routed experts; write the INT4 export
    to RUN_DIR/checkpoint. Resumes from RUN_DIR/qat_state.pt."""
    checkpoint, run_dir = Path(checkpoint), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_file = run_dir / "qat_state.pt"
    model = enable_qat_(_load_full_precision(checkpoint))
    train_rows, val_rows = qat_data(checkpoint, run_dir, model.config, seq_len, max_steps * batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    start = 0
    if state_file.exists():
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    metrics = open(run_dir / "metrics.jsonl", "a")

    def log(step: int, loss: float) -> None:
        metrics.write(json.dumps({"step": step, "loss": loss, "qat": True}) + "\n")
        if step % save_every == 0 or step == max_steps:
            metrics.flush()
            tmp = state_file.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, state_file)

    train(model, max_steps, lr, lambda step: train_rows.batch(step, batch), start=start, optimizer=opt, log=log,
          desc="qat")
    metrics.close()
    val = evaluate(model, val_rows)
    (run_dir / "report.md").write_text(f"# QAT\n\nfrom {checkpoint}, {max_steps} steps, lr {lr}\n\n"
                                       f"validation loss (fake-quantized INT4 experts): {val:.4f}\n")
    return k2lab.save_model(quantize_experts_(model), run_dir / "checkpoint")
