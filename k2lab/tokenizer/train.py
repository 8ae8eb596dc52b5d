"""Train a small K2-style vocabulary with Hugging Face `tokenizers`' BPE trainer.

The trainer sees the same pre-tokenization as the K2 tokenizer (the K2 split pattern, then byte-level), so
the learned tokens never cross a K2 pre-token boundary. Its vocabulary (256 bytes, then one token per merge,
in merge order) becomes the tiktoken ranks; the 256 special ids follow at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

from k2lab.tokenizer.tokenizer import NUM_RESERVED, PAT_STR, Tokenizer

# Default training text per vocabulary entry: 2 MB for 8192 (seconds), 8 MB for 32768 (about ten seconds);
# with min_frequency 2 that is about the least text that supports the size. More text, a better vocab.
BYTES_PER_TOKEN = 256


def train_tokenizer(vocab_size: int, paths: list[str | os.PathLike] | None = None,
                    out_dir: str | os.PathLike | None = None, max_bytes: int | None = None,
                    show_progress: bool = False) -> Tokenizer:
    """Learn `vocab_size - 256` BPE ranks from `paths` (None: the embedded corpus), add the K2 special
    tokens and chat template, and save to `out_dir` when given. Reads the first `max_bytes` bytes of text
    (None: BYTES_PER_TOKEN * vocab_size; 0: all of it)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from k2lab.data.corpus import iter_texts
    from k2lab.tokenizer.hf import bytes_to_unicode

    num_ranks = vocab_size - NUM_RESERVED
    if num_ranks < 256 + 1:
        raise ValueError(f"vocab_size {vocab_size} too small: need 256 bytes + 256 specials + at least one merge")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=num_ranks, min_frequency=2, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    cap = BYTES_PER_TOKEN * vocab_size if max_bytes is None else (max_bytes or None)
    hf.train_from_iterator(iter_texts(paths, cap), trainer=trainer)
    vocab = hf.get_vocab()
    if len(vocab) != num_ranks:
        raise ValueError(f"the training text only supports {len(vocab)} BPE tokens, fewer than the "
                         f"{num_ranks} that vocab_size {vocab_size} needs: give more text (max_bytes/paths)")
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    ranks = {bytes(u2b[c] for c in piece): i for piece, i in vocab.items()}
    tok = Tokenizer(ranks)
    if out_dir is not None:
        tok.save(Path(out_dir))
    return tok
