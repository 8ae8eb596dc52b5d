"""SFT data: chat JSONL -> K2-format token ids with assistant-only loss masks -> packed fixed-length rows.

A conversation is one JSONL line `{"messages": [...], "tools": [...]}` (the shape the synthesis stage writes
and the server accepts). `chat.render_sft` gives its ids and a mask that is 1 on what the assistant produces
(reasoning, content, tool calls, the closing <|im_end|>). Conversations are packed, in file order, into rows of
`seq_len` tokens (next fit; the tail of a row is padding with document id -1); each row carries `document_ids`
so the model attends only within a conversation and restarts positions per conversation
(`K2ForCausalLM(..., document_ids=...)`): a packed row computes what each conversation computes alone.

`sft_batches(...)` returns `batches(step)`, a pure function of (seed, step): the rows of step s are positions
[s*B, (s+1)*B) of an endless sequence of epochs, each epoch a permutation of the rows drawn from (seed, epoch).
`sft_loss(model, batch)` is the cross-entropy averaged over the trained tokens of the batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from k2lab.tokenizer.chat import render_sft

PAD_DOCUMENT = -1


def read_conversations(paths: list[str | Path]) -> list[dict]:
    """Conversations from chat JSONL files, in order; a bad line raises ValueError naming file and line."""
    out = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such file; pass chat JSONL files (one conversation per line)")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise ValueError(f"{path}:{n}: expected an object with a 'messages' list")
            if row.get("tools") is not None and not isinstance(row["tools"], list):
                raise ValueError(f"{path}:{n}: 'tools' must be a list of tool declarations")
            out.append({"messages": row["messages"], "tools": row.get("tools"), "where": f"{path}:{n}"})
    return out


def turns(messages: list[dict]) -> list[list[dict]]:
    """The message prefixes to train on, each ending after an assistant reply to a user (or system) message.

    K2.6 drops the reasoning of earlier turns, so a turn is trained in the context it was generated in only
    when it is among the trailing turns of its prefix (`chat.render_sft`). Conversations with no reasoning render
    every turn the same either way and stay one example (no repeated prefixes)."""
    if not any(isinstance(m, dict) and m.get("reasoning_content") for m in messages):
        return [messages]
    ends = [i for i in range(1, len(messages))
            if messages[i].get("role") in ("user", "system") and messages[i - 1].get("role") in ("assistant", "tool")]
    return [messages[:i] for i in ends] + [messages]


def render(tokenizer, conversations: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per training example (one per conversation, or per user turn when earlier turns hold
    reasoning, see `turns`); a conversation the chat format refuses raises with its file:line."""
    out = []
    for conv in conversations:
        where = conv.get("where", "conversation")
        examples = turns(conv["messages"])
        for messages in examples:
            try:
                ids, mask = render_sft(tokenizer, messages, conv.get("tools"), chat_format=tokenizer.chat_format,
                                       preserve_thinking=len(examples) == 1)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if not any(mask):
                raise ValueError(f"{where}: no assistant message to train on")
            out.append((ids, mask))
    return out


@dataclass
class Packed:
    input_ids: torch.Tensor  # [N, seq_len] long
    loss_mask: torch.Tensor  # [N, seq_len] 1 where the token is a training target (assistant output)
    document_ids: torch.Tensor  # [N, seq_len] conversation index, PAD_DOCUMENT on padding
    dropped: list[int] = field(default_factory=list)  # conversations longer than seq_len, left out

    @property
    def fill(self) -> float:
        """Share of row tokens that belong to a conversation."""
        return float((self.document_ids != PAD_DOCUMENT).float().mean())


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Packed:
    """Next-fit packing in order: a conversation goes into the current row if it fits, else starts a new one.
    Conversations longer than seq_len are left out and listed in `dropped` (never cut: the cut would fall in
    an answer)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    rows: list[list[tuple[int, list[int], list[int]]]] = []
    used, dropped = seq_len, []
    for doc, (ids, mask) in enumerate(examples):
        if len(ids) > seq_len:
            dropped.append(doc)
            continue
        if used + len(ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((doc, ids, mask))
        used += len(ids)
    if not rows:
        raise ValueError(f"no conversation fits in seq_len {seq_len} ({len(dropped)} longer ones left out)")
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), seq_len, dtype=torch.long)
    document_ids = torch.full((len(rows), seq_len), PAD_DOCUMENT, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for doc, ids, mask in row:
            input_ids[r, at:at + len(ids)] = torch.tensor(ids)
            loss_mask[r, at:at + len(ids)] = torch.tensor(mask)
            document_ids[r, at:at + len(ids)] = doc
            at += len(ids)
    return Packed(input_ids, loss_mask, document_ids, dropped)


def batches_from(packed: Packed, batch_size: int, seed: int) -> Callable[[int], dict[str, torch.Tensor]]:
    """`batches(step)` over packed rows: deterministic in (seed, step), epochs reshuffled, no state."""
    n = len(packed.input_ids)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def batches(step: int) -> dict[str, torch.Tensor]:
        flat = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, pos = flat // n, flat % n
        order = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
        rows = torch.as_tensor(np.array([order[e][p] for e, p in zip(epochs, pos)]))
        return {"input_ids": packed.input_ids[rows], "loss_mask": packed.loss_mask[rows],
                "document_ids": packed.document_ids[rows]}

    return batches


def sft_batches(paths: list[str | Path], tokenizer, seq_len: int, batch_size: int,
                seed: int = 0) -> tuple[Callable[[int], dict[str, torch.Tensor]], Packed]:
    """Read, render and pack chat JSONL files; (batches(step), the packed rows for statistics)."""
    packed = pack(render(tokenizer, read_conversations(paths)), seq_len, tokenizer.pad_id)
    return batches_from(packed, batch_size, seed), packed


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's trained tokens (assistant output), within documents."""
    ids, docs = batch["input_ids"], batch["document_ids"]
    logits = model(ids, document_ids=docs)[:, :-1]
    target_mask = batch["loss_mask"][:, 1:].bool() & (docs[:, 1:] == docs[:, :-1])
    if not target_mask.any():
        raise ValueError("sft_loss: the batch has no trained token")
    return F.cross_entropy(logits[target_mask].float(), ids[:, 1:][target_mask])
