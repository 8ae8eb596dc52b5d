"""The K2 tokenizer: tiktoken byte-level BPE with the K2 split pattern and 256 reserved special tokens.

A vocabulary of size V holds V-256 BPE ranks followed by 256 special ids, named as in K2 at the same offsets
from the end ([BOS] = V-256, [EOS] = V-255, <|im_end|> = V-254, ..., [PAD] = V-1). Unnamed slots are
`<|reserved_token_{id}|>` with the absolute id, the convention of K2's `tokenization_kimi.py`.

Files: `tiktoken.model` (base64 token, rank per line, as K2 ships it), `tokenizer_config.json` (special
tokens, chat template) and `tokenizer.json` (the same BPE for Hugging Face `tokenizers`, so transformers'
AutoTokenizer, vLLM and SGLang load the directory without remote code).
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import tiktoken

from k2lab.runs import write_atomic
from k2lab.tokenizer.templates import K2_6, chat_format_of, check_format

# K2's split pattern: Han runs; letter words with an optional leading non-letter and English contractions
# (lower-case-led and upper-case-led); digits in groups of 1-3; punctuation runs with trailing newlines;
# newline runs; trailing whitespace; whitespace.
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

NUM_RESERVED = 256
# Named special tokens by offset from V-256 (K2: 163584 + offset).
NAMED_SPECIALS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
    18: "<|media_begin|>", 19: "<|media_content|>", 20: "<|media_end|>", 21: "<|media_pad|>",
    22: "<think>", 23: "</think>", 254: "[UNK]", 255: "[PAD]",
}

# tiktoken panics on very long inputs and is slow on very long runs of whitespace or non-whitespace
# (github.com/openai/tiktoken/issues/195), so long inputs are encoded in pieces.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_WHITESPACE = re.compile(r"\s")
_RUN = re.compile(r"\s+|\S+")
# Before a space that follows a printable ASCII character: no pre-token of PAT_STR holds a non-space
# character followed by a space, so cutting there leaves the token ids unchanged.
_SAFE_CUT = re.compile(r"(?<=[!-~]) ")


def default_special_names(num_ranks: int) -> dict[str, int]:
    """The K2 special-token names for a vocabulary with `num_ranks` BPE ranks."""
    return {NAMED_SPECIALS.get(k, f"<|reserved_token_{num_ranks + k}|>"): num_ranks + k
            for k in range(NUM_RESERVED)}


def _split_long(text: str) -> Iterator[str]:
    """Cut `text` into pieces tiktoken encodes safely: at most MAX_ENCODE_CHARS chars, cut at safe
    boundaries where possible; runs over MAX_RUN_CHARS chars are cut every MAX_RUN_CHARS chars (as K2 does)."""
    start = 0
    while len(text) - start > MAX_ENCODE_CHARS:
        end = start + MAX_ENCODE_CHARS
        cut = None
        for m in _SAFE_CUT.finditer(text, start + MAX_ENCODE_CHARS // 2, end):
            cut = m.start()
        end = cut or end
        yield from _split_runs(text[start:end])
        start = end
    yield from _split_runs(text[start:])


def _may_have_long_run(text: str) -> bool:
    """Cheap test: a run over MAX_RUN_CHARS covers a whole aligned block of MAX_RUN_CHARS // 2 chars,
    so it suffices to find an all-space or space-free block (each check stops at its first mismatch)."""
    step = MAX_RUN_CHARS // 2
    return any(block.isspace() or not _WHITESPACE.search(block)
               for block in (text[i:i + step] for i in range(0, len(text) - step + 1, step)))


def _split_runs(text: str) -> Iterator[str]:
    if len(text) <= MAX_RUN_CHARS or not _may_have_long_run(text):
        yield text
        return
    start = 0
    for m in _RUN.finditer(text):
        for cut in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
            yield text[start:cut]
            start = cut
    yield text[start:]


class Tokenizer:
    """tiktoken BPE + K2 special tokens. `encode` parses special-token text only when `allow_special`.
    `chat_format` names the chat format (k2lab.tokenizer.chat) the checkpoint was trained with; `chat_template`
    is the Jinja template saved with it (None: the format's own)."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_names: dict[str, int] | None = None,
                 chat_template: str | None = None, name: str = "k2lab", chat_format: str = K2_6):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError(f"BPE ranks must be exactly 0..{n - 1}")
        self.special_tokens = special_names or default_special_names(n)
        if sorted(self.special_tokens.values()) != list(range(n, n + NUM_RESERVED)):
            raise ValueError(f"special tokens must take ids {n}..{n + NUM_RESERVED - 1} (256 reserved ids)")
        self.mergeable_ranks = mergeable_ranks
        self.chat_template = chat_template
        self.chat_format = check_format(chat_format)
        self.enc = tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.vocab_size = n + NUM_RESERVED
        ids = {t: self.special_tokens[t] for t in NAMED_SPECIALS.values() if t in self.special_tokens}
        self.bos_id, self.eos_id = ids.get("[BOS]"), ids.get("[EOS]")
        self.pad_id, self.unk_id = ids.get("[PAD]"), ids.get("[UNK]")
        self.im_end_id, self.im_user_id = ids.get("<|im_end|>"), ids.get("<|im_user|>")
        self.im_assistant_id, self.im_system_id = ids.get("<|im_assistant|>"), ids.get("<|im_system|>")
        self.im_middle_id = ids.get("<|im_middle|>")
        self._special_set = frozenset(self.special_tokens)

    # ---- encode / decode ----
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token text becomes a special id only with `allow_special`;
        otherwise it is encoded as ordinary text (so user content can never forge a marker)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        kw = {"allowed_special": self._special_set} if allow_special else {"disallowed_special": ()}
        if len(text) <= MAX_RUN_CHARS:
            return self.enc.encode(text, **kw)
        ids: list[int] = []
        for piece in _split_long(text):
            ids.extend(self.enc.encode(piece, **kw))
        return ids

    def encode_batch(self, texts: list[str], allow_special: bool = False, num_threads: int = 8) -> list[list[int]]:
        """`encode` for many texts at once, on tiktoken's thread pool."""
        pieces, owner = [], []
        for i, text in enumerate(texts):
            for piece in _split_long(text) if len(text) > MAX_RUN_CHARS else (text,):
                pieces.append(piece)
                owner.append(i)
        kw = {"allowed_special": self._special_set} if allow_special else {"disallowed_special": ()}
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(owner, self.enc.encode_batch(pieces, num_threads=num_threads, **kw)):
            out[i].extend(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def id_to_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary [0, {self.vocab_size})")
        return self.enc.decode_single_token_bytes(token_id)

    def id_to_piece(self, token_id: int) -> str:
        """The text of one token (a token holding part of a UTF-8 character shows U+FFFD)."""
        return self.id_to_bytes(token_id).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.vocab_size - NUM_RESERVED

    def decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    # ---- files ----
    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read `tiktoken.model` and `tokenizer_config.json` (K2's files or k2lab's); the chat template comes from
        the config or, failing that, `chat_template.jinja`."""
        d = Path(directory)
        model, config = d / "tiktoken.model", d / "tokenizer_config.json"
        if not model.is_file():
            raise FileNotFoundError(f"no tiktoken.model in {d}")
        ranks = {}
        for lineno, line in enumerate(model.read_text().splitlines(), 1):
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{model}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}") from e
        cfg = json.loads(config.read_text()) if config.is_file() else {}
        n = len(ranks)
        named = {int(i): t["content"] for i, t in cfg.get("added_tokens_decoder", {}).items()}
        specials = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(n, n + NUM_RESERVED)}
        if "chat_template" not in cfg and (d / "chat_template.jinja").is_file():
            cfg["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(ranks, specials, chat_template=cfg.get("chat_template"), name=d.name or "k2lab",
                   chat_format=chat_format_of(cfg))

    def save(self, directory: str | os.PathLike) -> None:
        """Write tiktoken.model, tokenizer.json, tokenizer_config.json and chat_template.jinja (each atomically)."""
        from k2lab.tokenizer.hf import hf_tokenizer_json, tokenizer_config

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        lines = (f"{base64.b64encode(tok).decode()} {rank}\n"
                 for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]))
        write_atomic(d / "tiktoken.model", "".join(lines))
        write_atomic(d / "tokenizer.json", hf_tokenizer_json(self))
        write_atomic(d / "tokenizer_config.json", json.dumps(tokenizer_config(self), indent=2, ensure_ascii=False))
        write_atomic(d / "chat_template.jinja", tokenizer_config(self)["chat_template"])


class IncrementalDecoder:
    """Token-by-token text for streaming: `add(id)` returns the text completed so far, never half a
    UTF-8 character; `flush()` returns what is left (an incomplete character as U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.id_to_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
