"""Pre-training with MuonClip: `k2lab pretrain` and `torchrun --nproc-per-node N -m k2lab.train.pretrain`.

Builds the run's data (a tokenizer trained on the corpus unless one is given; documents packed into rows;
held-out rows from their own documents) and runs the training loop (k2lab.train.loop) on it. The run directory
holds run.json (the settings), tokenizer/, data/ (packed rows), checkpoints/, metrics.jsonl, tensorboard/,
plots/. `--qat` pre-trains with fake-quantized INT4 routed experts; `--init-from` starts from a checkpoint
instead of random weights (what `k2lab qat` does); `--encyclopedia X` makes a share X of the training rows
synthetic-encyclopedia articles (its seen entities' facts, which the calibration eval asks about). The mix is a
share of rows rather than a corpus file because files are read in a shuffled order only until the run has enough
tokens: a file could be read whole, in part or not at all, and the share would depend on where it fell.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from k2lab.config import ModelConfig
from k2lab.runs import claim
from k2lab.tokenizer.tokenizer import NUM_RESERVED
from k2lab.train import distributed as dist_utils
from k2lab.train.data import (PackedRows, build_dataset, check_readable, copy_rows, embedded_corpus,
                             encyclopedia_rows)
from k2lab.train.loop import check_unfinished, train
from k2lab.train.settings import PretrainSettings


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


def _init_model(s: PretrainSettings, config: ModelConfig):
    import k2lab
    import torch

    from k2lab.model import K2ForCausalLM

    if s.init_from:
        return k2lab.load_model(s.init_from, dtype=torch.float32)
    model = K2ForCausalLM(config)
    model.init_weights(seed=s.seed)
    return model


def pretrain(s: PretrainSettings, tokenizer=None, kind: str = "pretrain") -> dict:
    """Train (or resume) the run in s.run_dir; returns the last step's metrics.

    tokenizer: an object with `.encode(text) -> list[int]` to use instead of the run's tokenizer (byte-level
    encoding for a checkpoint without one; tests). kind: the run kind recorded in run.json.
    """
    s.check()
    rank, world, device = dist_utils.setup()
    config = s.model_config()
    run_dir = Path(s.run_dir)
    if rank == 0:
        claim(run_dir, s.identity(config), kind, inputs=("data", "tokenizer"), added=s.ADDED)  # inputs: prepared
    check_unfinished(run_dir, s.max_steps)  # before any data is built
    if rank == 0 and not (run_dir / "data" / "train.npy").exists():
        paths = [Path(p) for p in s.data] or embedded_corpus()
        check_readable(paths)  # before a tokenizer is trained on them
        encoder = tokenizer if tokenizer is not None else _tokenizer(s, run_dir, config)
        rows = s.max_steps * s.batch_size
        mixed = []
        if s.encyclopedia:
            chat = s.encyclopedia_qa_format == "chat"  # its markers are special tokens
            encode = partial(encoder.encode, allow_special=True) if chat else encoder.encode
            mixed.append(encyclopedia_rows(encode, config.eos_token_id, s.seq_len, round(rows * s.encyclopedia),
                                           qa=s.encyclopedia_qa, qa_format=s.encyclopedia_qa_format,
                                           qa_entities=s.encyclopedia_qa_entities))
        if s.copy_rows:  # ordinary tokens only: the special ones are the last NUM_RESERVED of the vocabulary
            mixed.append(copy_rows(s.seq_len, round(rows * s.copy_rows), config.vocab_size - NUM_RESERVED, s.seed))
        build_dataset(paths, encoder.encode, config.eos_token_id, s.seq_len, rows, s.val_rows, s.seed,
                      run_dir / "data", mixed_in=np.concatenate(mixed) if mixed else None)
    tok_dir = Path(s.tokenizer) if s.tokenizer else run_dir / "tokenizer"
    tok_dir = tok_dir if (tok_dir / "tiktoken.model").is_file() else None  # copied into each checkpoint
    dist_utils.barrier()
    train_rows = PackedRows(run_dir / "data" / "train.npy", s.seed)
    val_rows = PackedRows(run_dir / "data" / "val.npy", s.seed).rows[: s.val_rows]
    return train(s, run_dir, lambda: _init_model(s, config),
                 lambda step: {"tokens": train_rows.batch(step, s.batch_size)},
                 val={"tokens": val_rows} if s.val_rows else None, tokenizer_dir=tok_dir,
                 desc="qat" if s.qat else "pretrain")


def main(argv: list[str] | None = None) -> None:
    """Entry point for torchrun: flags are the PretrainSettings fields (--max-steps 10 --run-dir DIR ...)."""
    dist_utils.run_main(PretrainSettings, pretrain, "python -m k2lab.train.pretrain", argv)


if __name__ == "__main__":
    main()
