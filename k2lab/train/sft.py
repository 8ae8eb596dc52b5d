"""`k2lab sft`: supervised fine-tuning on chat JSONL, through the one training loop (k2lab.train.loop).

Data: chat JSONL -> K2-format token ids with assistant-only loss masks -> packed fixed-length rows.

A conversation is one JSONL line `{"messages": [...], "tools": [...]}` (the shape the synthesis stage writes
and the server accepts). `chat.render_sft` gives its ids and a mask that is 1 on what the assistant produces
(content, tool calls, the closing <|im_end|>; reasoning with --thinking). Thinking is off by default: every
assistant turn is `<think></think>` (prompt-side) + its output, token for token what RL episodes render and what
the server renders for a request with `chat_template_kwargs: {"thinking": false}`, so the model learns to answer
after exactly the prompt it will be given. Conversations are packed, in file order, into rows of
`seq_len` tokens (first fit; the tail of a row is padding with document id -1); each row carries `document_ids`
so the model attends only within a conversation and restarts positions per conversation
(`K2ForCausalLM(..., document_ids=...)`): a packed row computes what each conversation computes alone.

`batches_from(...)` gives the loop's `batches(step)`, a pure function of (seed, step): the rows of step s are
positions [s*B, (s+1)*B) of an endless sequence of epochs, each epoch a permutation of the rows drawn from
(seed, epoch). The loop's `token_losses` with the rows' document ids is the loss; the loss mask is 1 on a target
that is assistant output of the same conversation as the token before it.

A run (`sft`): held-out conversations are drawn from the data before packing; the run directory keeps the
prepared data (data/: packed rows and held-out conversations), so a resumed run trains on exactly what it
started with even if the files changed. Every eval_every steps the held-out loss and the tool-call eval
(k2lab.train.toolcall_eval; on --eval-toolcalls, a `k2lab eval toolcalls` set such as the held-out tools of
k2lab.synth.heldout, kept in data/ too, else on the held-out conversations' first turns) are logged to
metrics.jsonl and plotted.

`--qat --distill` (QAT by self-distillation): the loss of each assistant token is KL(teacher || model) between
the next-token distributions of a frozen copy of the starting checkpoint and of the model being trained (with
fake-quantized INT4 experts), and only the routed experts' weights train (the router biases keep their values: no
load-balancing updates); the loss and the held-out loss are then that KL. Cross-entropy on the data would
also pull the model toward the data (for a checkpoint after RL: back toward SFT's behaviour); the KL is 0 where
the quantized model already matches the full-precision one and only asks it to recover what quantizing lost.
Under torchrun each rank holds a whole teacher, unsharded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from k2lab.evals.toolcall import load_dataset
from k2lab.quant.checkpoint import is_int4_checkpoint
from k2lab.runs import atomic_path, claim, read_jsonl, rewrite_jsonl
from k2lab.tokenizer.chat import render_sft
from k2lab.train import distributed as dist_utils
from k2lab.train.loop import check_unfinished, token_losses, train
from k2lab.train.settings import SftSettings

PAD_DOCUMENT = -1


def distill_losses(teacher, model, tokens: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(teacher || model) of the next-token distributions: tokens [B, T+1] -> [B, T] (fp32).
    The teacher runs without gradients; document_ids [B, T+1] keep each packed conversation to itself."""
    docs = None if document_ids is None else document_ids[:, :-1]
    with torch.no_grad():
        target = teacher(tokens[:, :-1], document_ids=docs).float().log_softmax(-1)
    logp = model(tokens[:, :-1], document_ids=docs).float().log_softmax(-1)
    return (target.exp() * (target - logp)).sum(-1)


def train_only_routed_experts_(model) -> None:
    """Freeze every parameter but the routed experts' weights (the ones INT4 rounds): --distill trains those alone.
    The rest already equals the teacher, and AdamW steps on weights at their optimum only add noise: on the test
    checkpoint, 8 steps at lr 1e-4 took the held-out KL of the export from PTQ's 0.0084 to 0.0129 training every
    weight, to 0.0074 training the experts alone (tests/test_sft_cli.py's inputs, 2026-12-01)."""
    for name, p in model.named_parameters():
        p.requires_grad_(".experts." in name)


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


def render(tokenizer, conversations: list[dict], thinking: bool = False) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per training example; a conversation the chat format refuses raises with its file:line.

    Thinking off (the default): one example per conversation, every turn as `<think></think>` + its output,
    token for token what RL episodes (`encode_turns`) and a server asked with thinking off render; reasoning
    in the data is not trained. Thinking on: one example per conversation, or per user turn when earlier turns
    hold reasoning (see `turns`)."""
    out = []
    for conv in conversations:
        where = conv.get("where", "conversation")
        examples = turns(conv["messages"]) if thinking else [conv["messages"]]
        for messages in examples:
            try:
                ids, mask = render_sft(tokenizer, messages, conv.get("tools"), chat_format=tokenizer.chat_format,
                                       thinking=thinking, preserve_thinking=thinking and len(examples) == 1)
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
    """First-fit packing in order: a conversation goes into the first row with room for it, else starts a new
    one (padding is compute spent on nothing: next fit left a third of the rows empty on tool conversations of
    a quarter to a half of a row). Conversations longer than seq_len are left out and listed in `dropped`
    (never cut: the cut would fall in an answer)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    rows: list[list[tuple[int, list[int], list[int]]]] = []
    used: list[int] = []
    dropped = []
    for doc, (ids, mask) in enumerate(examples):
        if len(ids) > seq_len:
            dropped.append(doc)
            continue
        r = next((r for r, u in enumerate(used) if u + len(ids) <= seq_len), len(rows))
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append((doc, ids, mask))
        used[r] += len(ids)
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
    """The loop's `batches(step)` over packed rows: deterministic in (seed, step), epochs reshuffled, no state."""
    n = len(packed.input_ids)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def batches(step: int) -> dict[str, torch.Tensor]:
        flat = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, pos = flat // n, flat % n
        order = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
        return loop_batch(packed, torch.as_tensor(np.array([order[e][p] for e, p in zip(epochs, pos)])))

    return batches


def loop_batch(packed: Packed, rows: torch.Tensor | slice = slice(None)) -> dict[str, torch.Tensor]:
    """Packed rows in the loop's form: tokens [B, T+1], loss_mask [B, T] on the targets (assistant output whose
    previous token is in the same conversation), document_ids [B, T+1]."""
    ids, docs = packed.input_ids[rows], packed.document_ids[rows]
    mask = packed.loss_mask[rows][:, 1:].bool() & (docs[:, 1:] == docs[:, :-1])
    return {"tokens": ids, "loss_mask": mask.long(), "document_ids": docs}


def split(conversations: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(training, held-out) conversations; the held-out ones drawn at random from (seed), order kept."""
    n_val = round(len(conversations) * val_fraction)
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= len(conversations):
        raise ValueError(f"{len(conversations)} conversations leave none to train on after holding out "
                         f"{n_val}; lower --val-fraction or give more data")
    held = set(np.random.default_rng([seed, 1]).permutation(len(conversations))[:n_val].tolist())
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


def prepare(s: SftSettings, tokenizer) -> dict:
    """The run's data from the files: packed training and held-out rows, and the held-out conversations. Every
    input error surfaces here, before the run directory is claimed."""
    conversations = read_conversations(s.data)
    if not conversations:
        raise ValueError(f"no conversation in {', '.join(s.data)}; pass chat JSONL (one conversation per line)")
    out = {}
    if s.eval_toolcalls:
        try:
            out["toolcalls"] = load_dataset(s.eval_toolcalls).rows
        except (OSError, ValueError) as e:
            raise ValueError(f"--eval-toolcalls {s.eval_toolcalls}: {e}") from None
        if missing := [r["id"] for r in out["toolcalls"] if not r.get("expect")]:
            raise ValueError(f"--eval-toolcalls {s.eval_toolcalls}: rows {missing[:5]} have no 'expect' "
                             f"(tool_calls or stop), which the eval scores against")
    rendered = [(conv, render(tokenizer, [conv], s.thinking)) for conv in conversations]  # every error before the split
    train_part, val_part = split(rendered, s.val_fraction, s.seed)
    out["heldout"] = [conv for conv, _ in val_part]
    for name, part in (("train", train_part), ("val", val_part)):
        if part:
            out[name] = pack([e for _, examples in part for e in examples], s.seq_len, tokenizer.pad_id)
    return out


def save_prepared(data: dict, data_dir: Path) -> None:
    """data_dir/{train,val}.pt, toolcalls.jsonl (the eval set, when given) and heldout.jsonl (written last: its
    presence means the data is complete)."""
    for name in ("train", "val"):
        if name in data:
            with atomic_path(data_dir / f"{name}.pt") as tmp:
                torch.save(dataclasses.asdict(data[name]), tmp)
    if "toolcalls" in data:
        rewrite_jsonl(data_dir / "toolcalls.jsonl", data["toolcalls"])
    rewrite_jsonl(data_dir / "heldout.jsonl", data["heldout"])


def load_packed(path: Path) -> Packed:
    return Packed(**torch.load(path))


def _check_sizes(s: SftSettings, tokenizer, config) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{s.checkpoint}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{config.vocab_size}; use the tokenizer the checkpoint was trained with")
    if s.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {s.seq_len} exceeds the model's {config.max_position_embeddings} positions")


def sft(s: SftSettings) -> dict:
    """Fine-tune s.checkpoint on s.data in s.run_dir (a rerun resumes); returns the last step's metrics."""
    import k2lab
    from k2lab.config import ModelConfig
    from k2lab.tokenizer import Tokenizer
    from k2lab.train.metrics import read_metrics
    from k2lab.train.toolcall_eval import ToolcallEval, plot_toolcalls, requests_from_conversations

    s.check()
    if s.distill:  # the teacher's routing is part of what is distilled: the router biases keep their values
        s = dataclasses.replace(s, bias_update_speed=0.0)
    checkpoint, run_dir = Path(s.checkpoint), Path(s.run_dir)
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"{checkpoint}: not a checkpoint directory (no config.json); pass --checkpoint DIR")
    if not (checkpoint / "tiktoken.model").is_file():
        raise ValueError(f"{checkpoint} has no tokenizer (tiktoken.model); SFT renders chats with the "
                         f"checkpoint's own tokenizer")
    if s.qat and is_int4_checkpoint(checkpoint):  # its experts are packed INT4, with no latent weights to train
        raise ValueError(f"{checkpoint} is already INT4; QAT starts from a full-precision checkpoint (the one it "
                         f"was quantized from)")
    config = ModelConfig.load(checkpoint)
    tokenizer = Tokenizer.load(checkpoint)
    _check_sizes(s, tokenizer, config)
    data_dir = run_dir / "data"
    rank, _, device = dist_utils.setup()
    if rank == 0:  # under torchrun rank 0 prepares the data; the others read it
        prepared = None if (data_dir / "heldout.jsonl").exists() else prepare(s, tokenizer)
        claim(run_dir, s.identity(), "sft", inputs=("data",), added=s.ADDED)
    check_unfinished(run_dir, s.max_steps)
    if rank == 0 and prepared is not None:
        save_prepared(prepared, data_dir)
    dist_utils.barrier()
    train_rows = load_packed(data_dir / "train.pt")
    heldout = read_jsonl(data_dir / "heldout.jsonl")
    val = loop_batch(load_packed(data_dir / "val.pt")) if heldout else None
    requests = (read_jsonl(data_dir / "toolcalls.jsonl") if (data_dir / "toolcalls.jsonl").exists()
                else requests_from_conversations(heldout, s.thinking))
    evals = (dist_utils.on_rank0(ToolcallEval(requests, tokenizer, s.eval_max_new_tokens,
                                              config.max_position_embeddings)) if requests else None)
    def load():
        return k2lab.load_model(checkpoint, dtype=torch.float32, text_only=True)
    loss_fn, on_model = token_losses, None
    if s.distill:
        teacher = load().to(device).eval().requires_grad_(False)
        loss_fn, on_model = functools.partial(distill_losses, teacher), train_only_routed_experts_
    record = train(s, run_dir, load, batches_from(train_rows, s.batch_size, s.seed), loss_fn=loss_fn, val=val,
                   evals=evals, tokenizer_dir=checkpoint, desc="qat-distill" if s.distill else "sft",
                   on_model=on_model)
    if rank == 0:
        plot_toolcalls(run_dir, read_metrics(run_dir))
    return record


def main(argv: list[str] | None = None) -> None:
    """Entry point for torchrun: `torchrun --nproc-per-node N -m k2lab.train.sft --checkpoint DIR --data F ...`
    (flags are the SftSettings fields)."""
    dist_utils.run_main(SftSettings, sft, "python -m k2lab.train.sft", argv)


if __name__ == "__main__":
    main()
