"""`k2lab qat`: INT4 quantization-aware training of a full-precision checkpoint, as a mode of the training loop.

Continues training CHECKPOINT with fake-quantized INT4 routed experts (k2lab.quant.qat; AdamW, the loop's
schedule) on the pre-training data pipeline: the embedded corpus encoded with the checkpoint's tokenizer, or as
bytes for a checkpoint that has none. The run resumes like any training run; at the end the latent weights are
quantized with the rule QAT trained against and written to RUN_DIR/checkpoint (compressed-tensors INT4).
"""

from __future__ import annotations

from pathlib import Path

import torch

import k2lab
from k2lab.config import ModelConfig
from k2lab.quant.checkpoint import is_int4_checkpoint, quantize_experts_
from k2lab.runs import atomic_dir, write_atomic
from k2lab.tokenizer import Tokenizer
from k2lab.train.checkpoint import TOKENIZER_FILES, checkpoint_dirs
from k2lab.train.pretrain import PretrainSettings, pretrain


class ByteEncoder:
    """UTF-8 bytes as token ids, for a checkpoint without a tokenizer (its vocabulary must hold 256 ids)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def qat(checkpoint: str | Path, run_dir: str | Path, max_steps: int, lr: float = 3e-4, batch: int = 8,
        seq_len: int = 256, save_every: int = 50) -> Path:
    """Run (or resume) QAT from `checkpoint` in `run_dir`; returns the INT4 export RUN_DIR/checkpoint."""
    checkpoint, run_dir = Path(checkpoint), Path(run_dir)
    if is_int4_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is already INT4; QAT starts from a full-precision checkpoint")
    has_tokenizer = (checkpoint / "tiktoken.model").is_file()
    config = ModelConfig.load(checkpoint)
    if not has_tokenizer and config.vocab_size <= 256:
        raise ValueError(f"{checkpoint} has no tokenizer and its vocab ({config.vocab_size}) cannot hold bytes")
    s = PretrainSettings(init_from=str(checkpoint), qat=True, optimizer="adamw", lr=lr, batch_size=batch,
                         seq_len=seq_len, max_steps=max_steps, save_every=save_every, run_dir=str(run_dir),
                         tokenizer=str(checkpoint) if has_tokenizer else None)
    last = pretrain(s, tokenizer=None if has_tokenizer else ByteEncoder(), kind="qat")
    write_atomic(run_dir / "report.md", f"# QAT\n\nfrom {checkpoint}, {max_steps} steps, lr {lr}\n\n"
                                        f"held-out loss (fake-quantized INT4 experts): {last['val_loss']:.4f}\n")
    latent = k2lab.load_model(checkpoint_dirs(run_dir)[-1], dtype=torch.float32)
    out = run_dir / "checkpoint"
    with atomic_dir(out) as tmp:
        k2lab.save_model(quantize_experts_(latent), tmp)
        for name in TOKENIZER_FILES if has_tokenizer else ():
            (tmp / name).write_bytes((checkpoint / name).read_bytes())
    return out


def quantize(checkpoint: str | Path, out: str | Path) -> Path:
    """PTQ (`k2lab quantize`): full-precision checkpoint -> compressed-tensors INT4 checkpoint (routed experts
    only; a multimodal checkpoint keeps its vision tower), carrying the checkpoint's tokenizer."""
    if is_int4_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is already INT4; PTQ starts from a full-precision checkpoint")
    model = quantize_experts_(k2lab.load_model(checkpoint, dtype=torch.float32))
    k2lab.save_model(model, out)
    if (Path(checkpoint) / "tiktoken.model").exists():  # a checkpoint directory carries its tokenizer
        Tokenizer.load(checkpoint).save(out)
    return Path(out)
