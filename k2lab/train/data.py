"""Pre-training data: documents from the embedded corpus (k2lab.data.corpus) or given files, tokenized, packed into fixed-length
rows with an eos between documents, split into train and held-out rows, and served as a pure function of
the step (so a resumed run reads exactly the rows it would have read)."""

from __future__ import annotations

import json
import os
import random
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from k2lab.data import DatasetError
from k2lab.data.corpus import corpus_files
from k2lab.data.encyclopedia import DOMAIN, QA_FORMATS, TOPIC, answer_sentence, corpus_documents, qa_text
from k2lab.runs import atomic_path

HELD_OUT_PIECE_ROWS = 8  # a held-out row is a window of its own 8-row stretch of text


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


def chat_qa(pairs: list[tuple[str, str]]) -> str:
    """An article's questions answered as one K2.6 conversation, thinking off: the calibration eval's system
    prompt, then each question as a user turn and its answer as SFT writes it. Its first turn is what
    post-training and the eval ask; one system prompt per article keeps the rows mostly facts (the text holds
    special tokens)."""
    from k2lab.evals.calibration import ANSWER_PROMPT
    from k2lab.tokenizer.chat import render

    turns = [m for q, a in pairs for m in ({"role": "user", "content": q},
                                           {"role": "assistant", "content": answer_sentence(a)})]
    return "\n" + render([{"role": "system", "content": ANSWER_PROMPT.format(domain=DOMAIN, topic=TOPIC)}, *turns],
                         thinking=False) + "\n"


def encyclopedia_rows(encode, eos_id: int, seq_len: int, rows: int, qa: bool = False,
                      qa_format: str = "text", qa_entities: str = "all") -> np.ndarray:
    """`rows` packed rows of synthetic-encyclopedia articles (k2lab.data.encyclopedia's default world, the one
    the knowledge domain and the calibration set ask about; seen entities only): freshly worded, shuffled passes
    over the articles, as many as fill the rows (the run's seed orders the rows, not the world). `qa`: the
    post-training entities' articles end with their questions answered (encyclopedia.corpus_documents), as
    `qa_format` "text" ("Q: ... A: ...") or "chat" (`chat_qa`; `encode` must then map special-token text to
    the special ids); `qa_entities`: every post-training entity's questions, or "half" of them (`qa_half`)."""
    if qa_format not in QA_FORMATS:
        raise ValueError(f"unknown QA format {qa_format!r}; choose {' or '.join(QA_FORMATS)}")
    render = chat_qa if qa_format == "chat" else qa_text
    width = seq_len + 1
    docs = partial(corpus_documents, qa=qa, qa_render=render, qa_entities=qa_entities)
    one_pass = sum(len(encode(d)) + 1 for d in docs(passes=1))
    passes = -(-rows * width // one_pass) + 1  # + 1: wordings differ, so passes differ a little in length
    toks = [t for doc in docs(passes=passes) for t in encode(doc) + [eos_id]]
    return np.asarray(toks[: rows * width], dtype=np.int32).reshape(rows, width)


def copy_rows(seq_len: int, rows: int, vocab: int, seed: int) -> np.ndarray:
    """`rows` rows of synthetic in-context copying data: each a random sequence of 8-64 tokens drawn uniformly
    from ids [0, vocab) (pass the first special token's id), repeated to fill the row. After its first reading
    every token of a row is predictable only by copying from the context. Measured with the tiny model (README,
    In-context copying): such rows get fit without forming copying that works on a span read once more."""
    rng = np.random.default_rng([seed, 0x636F7079])  # "copy": a stream of its own, apart from the row order's
    out = np.empty((rows, seq_len + 1), dtype=np.int32)
    for i in range(rows):
        out[i] = np.resize(rng.integers(0, vocab, int(rng.integers(8, 65))), seq_len + 1)
    return out


def build_dataset(paths: list[Path], encode, eos_id: int, seq_len: int, train_rows: int, val_rows: int,
                  seed: int, out_dir: Path, mixed_in: np.ndarray | None = None) -> None:
    """Tokenize documents (in a seeded random order of the whole corpus) until both splits have enough rows,
    pack them and save train.npy / val.npy.

    Text is cut into pieces of HELD_OUT_PIECE_ROWS rows; each next piece goes to the split that is further
    behind its target, so held-out pieces are spread over the same stretch of the shuffled corpus that training
    reads (not taken from its first documents). A held-out piece gives one row, a window at a seeded random
    offset, so the held-out rows sample many places in many documents; no text feeds both splits. Only as many
    documents are tokenized as the run needs. `mixed_in`: packed rows added to the training split (they count
    towards `train_rows`; the training order shuffles them among the corpus rows).
    """
    check_readable(paths)
    order = list(paths)
    rng = random.Random(seed)
    rng.shuffle(order)
    width = seq_len + 1  # inputs are row[:-1], labels row[1:]
    piece = HELD_OUT_PIECE_ROWS * width
    extra = np.zeros((0, width), dtype=np.int32) if mixed_in is None else mixed_in
    need = {"val": val_rows * width, "train": max(train_rows - len(extra), 1) * width}
    streams: dict[str, list[int]] = {"val": [], "train": []}

    def behind(name: str) -> float:
        return len(streams[name]) / need[name] if need[name] else float("inf")

    def pieces():
        for path in tqdm(order, desc="tokenizing", unit="file", leave=False):
            for doc in read_document(path):
                toks = encode(doc) + [eos_id]
                yield from (toks[i:i + piece] for i in range(0, len(toks), piece))

    for part in pieces():
        split = "val" if behind("val") < behind("train") else "train"
        if split == "val" and len(part) > width:
            start = rng.randrange(len(part) - width + 1)
            part = part[start:start + width]
        streams[split].extend(part)
        if behind("val") >= 1 and behind("train") >= 1:
            break
    for name, toks in streams.items():
        rows = len(toks) // width
        if rows < (val_rows if name == "val" else 1):
            raise ValueError(f"the corpus gives only {len(toks)} {name} tokens, too few for rows of {width}")
        arr = np.asarray(toks[: rows * width], dtype=np.int32).reshape(rows, width)
        if name == "train":
            arr = np.concatenate([arr, extra])
        with atomic_path(out_dir / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, arr)


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
