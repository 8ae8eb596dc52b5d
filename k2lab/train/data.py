"""Pre-training data: documents from the embedded corpus (k2lab.data.corpus) or given files, tokenized, packed into fixed-length
rows with an eos between documents, split into train and held-out rows, and served as a pure function of
the step (so a resumed run reads exactly the rows it would have read)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from k2lab.data import DatasetError
from k2lab.data.corpus import corpus_files


def embedded_corpus() -> list[Path]:
    """The embedded corpus's files (k2lab.data.corpus): the standard library source, without test suites."""
    return corpus_files()


def check_readable(paths: list[Path]) -> None:
    for p in paths:
        if not p.is_file() or not os.access(p, os.R_OK):
            raise DatasetError(f"cannot read corpus file {p}: no such readable file; check --data")


def read_document(path: Path) -> list[str]:
    """One text file is one document; a .jsonl file holds one document per line in its "text" field."""
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DatasetError(f"cannot read corpus file {path}: {e.strerror or e}") from None
    if path.suffix != ".jsonl":
        return [raw]
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DatasetError(f"{path}:{n} is not a JSON object with a \"text\" field") from None
    return docs


def build_dataset(paths: list[Path], encode, eos_id: int, seq_len: int, train_rows: int, val_rows: int,
                  seed: int, out_dir: Path) -> None:
    """Tokenize documents (in a seeded order) until there are enough rows, pack them and save .npy files.

    Held-out rows come from their own documents (the first ones in the shuffled order), never from a
    document that also feeds training. Only as many documents are tokenized as the run needs.
    """
    check_readable(paths)
    order = list(paths)
    random.Random(seed).shuffle(order)
    width = seq_len + 1  # inputs are row[:-1], labels row[1:]
    need = {"val": val_rows * width, "train": train_rows * width}
    streams: dict[str, list[int]] = {"val": [], "train": []}
    split = "val" if val_rows else "train"
    bar = tqdm(order, desc="tokenizing", unit="file", leave=False)
    for path in bar:
        for doc in read_document(path):
            streams[split].extend(encode(doc))
            streams[split].append(eos_id)
            if split == "val" and len(streams["val"]) >= need["val"]:
                split = "train"
        if len(streams["train"]) >= need["train"]:
            break
    bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, toks in streams.items():
        rows = len(toks) // width
        if rows < (val_rows if name == "val" else 1):
            raise ValueError(f"the corpus gives only {len(toks)} {name} tokens, too few for rows of {width}")
        arr = np.asarray(toks[: rows * width], dtype=np.int32).reshape(rows, width)
        tmp = out_dir / f".{name}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / f"{name}.npy")


class PackedRows:
    """Fixed-length token rows [N, seq_len + 1]; batch(step) is a pure function of (seed, step)."""

    def __init__(self, path: Path, seed: int):
        self.rows = torch.from_numpy(np.load(path)).long()
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The `batch_size` rows of optimizer step `step`: consecutive slots of a per-epoch permutation."""
        n = len(self.rows)
        slots = torch.arange(step * batch_size, (step + 1) * batch_size)
        out = []
        for epoch in (slots // n).unique().tolist():
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            out.append(perm[slots[slots // n == epoch] % n])
        return self.rows[torch.cat(out)]
