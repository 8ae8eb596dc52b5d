"""Hugging Face files for a k2lab tokenizer: `tokenizer.json` and `tokenizer_config.json`.

transformers, vLLM and SGLang then load the directory as a plain `PreTrainedTokenizerFast`, with no remote
code. The BPE merges are derived from the tiktoken ranks so that `tokenizers` reproduces tiktoken exactly:
for every token, every split into two tokens becomes a merge ranked by the token's own rank, and
`ignore_merges` looks whole pre-tokens up first, as tiktoken does.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from k2lab.tokenizer.templates import CHAT_FORMATS
from k2lab.tokenizer.tokenizer import PAT_STR

# Not special in Moonshot's tokenizer_config.json, so decoding with skip_special_tokens keeps them and a
# tool-call / reasoning parser downstream (vLLM's kimi_k2 parsers) still sees them.
NON_SPECIAL = frozenset({"<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                         "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<think>", "</think>"})

if TYPE_CHECKING:
    from k2lab.tokenizer.tokenizer import Tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE files."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def hf_tokenizer_json(tok: Tokenizer) -> str:
    """`tokenizer.json` text: byte-level BPE, the K2 split regex, special tokens as added tokens."""
    b2u = bytes_to_unicode()
    text = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    # in id order: the ranks' insertion order can vary between two trainings of the same vocabulary (set order),
    # and the same tokenizer should write the same file
    vocab = {text(t): r for t, r in sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1])}
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": name not in NON_SPECIAL}
             for name, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [[text(a), text(b)] for a, b in _merges(tok.mergeable_ranks)]},
    }
    return json.dumps(spec, ensure_ascii=False)


def tokenizer_config(tok: Tokenizer) -> dict:
    """`tokenizer_config.json`: class, special tokens (bos/eos/pad/unk, added_tokens_decoder), chat format and
    template."""
    name = {i: n for n, i in tok.special_tokens.items()}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name[tok.bos_id], "eos_token": name[tok.eos_id],
        "pad_token": name[tok.pad_id], "unk_token": name[tok.unk_id],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "added_tokens_decoder": {str(i): {"content": n, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": n not in NON_SPECIAL}
                                 for i, n in sorted(name.items())},
        "k2lab_chat_format": tok.chat_format,
        "chat_template": tok.chat_template or CHAT_FORMATS[tok.chat_format],
    }
