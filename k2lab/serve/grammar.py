"""Structured decoding with llguidance: strict tool calls and response_format JSON schemas.

llguidance (maintained by Microsoft, a CPU wheel with no dependencies) builds its token trie straight from
the tiktoken vocabulary, special tokens included, so the K2 tool-call markers are written into the Lark
grammar as tokens and the arguments as `%json` schemas. xgrammar was not used: its wheel pulls triton and a
CUDA stack; outlines-core has no Lark grammars with special tokens.
"""

from __future__ import annotations

import json

import torch
from llguidance import LLMatcher
from llguidance.tiktoken import lltokenizer_from_encoding

from k2lab.tokenizer import Tokenizer

_COMPACT = {"whitespace_flexible": False}  # no unbounded runs of whitespace inside JSON


class Grammar:
    """One request's matcher as an engine Constraint: the allowed-token mask and the tokens taken."""

    def __init__(self, matcher: LLMatcher, vocab: int, stop_ids: list[int]):
        self.matcher, self.vocab, self.stop_ids = matcher, vocab, stop_ids
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        if self.matcher.is_error():  # cannot continue: only a stop token
            mask = torch.zeros(self.vocab, dtype=torch.bool)
            mask[self.stop_ids] = True
            return mask
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        return ((words[:, None] >> self._bits) & 1).flatten()[: self.vocab].bool()

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    def finished(self) -> bool:
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Grammars over one tokenizer's vocabulary (the vocabulary trie is built once)."""

    def __init__(self, tokenizer: Tokenizer):
        self.stop_ids = [tokenizer.eos_id, tokenizer.im_end_id]
        self.vocab = tokenizer.vocab_size
        self.lltok = lltokenizer_from_encoding(tokenizer.enc, n_vocab=tokenizer.vocab_size, eos_token=self.stop_ids)

    def _matcher(self, lark: str) -> Grammar:
        matcher = LLMatcher(self.lltok, LLMatcher.grammar_from_lark(lark), log_level=0)
        if matcher.is_error():
            raise ValueError(f"cannot compile the grammar: {matcher.get_error()}")
        return Grammar(matcher, self.vocab, self.stop_ids)

    def json_schema(self, schema: dict, open_think: bool = False) -> Grammar:
        """The whole output is one JSON value of `schema` (response_format json_schema / json_object).
        open_think: the prompt ends inside <think> (K2.6 thinking mode), so the reasoning and </think> come first."""
        if open_think:
            return self._matcher(f"start: {_REASONING}{_json(schema)}\n{_TEXT}")
        return self._matcher(f"start: {_json(schema)}\n")

    def tool_calls(self, tools: list[dict], choice: str | dict, parallel: bool, open_think: bool = False) -> Grammar:
        """K2 tool-call syntax. choice: "auto" (text, then optionally calls), "required" (calls only) or
        {"function": {"name"}}. Arguments follow the tool's schema when the tool is strict or a call is required
        or named (OpenAI: a forced call must fit the tool); other calls' arguments are any JSON object."""
        if isinstance(choice, dict):
            tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
        forced = choice != "auto"
        rules = [f'call{i}: <|tool_call_begin|> "functions.{t["function"]["name"]}:" INDEX '
                 f'<|tool_call_argument_begin|> {_json(_arguments_schema(t["function"], forced))} <|tool_call_end|>'
                 for i, t in enumerate(tools)]
        calls = "call" + ("+" if parallel else "")
        # required/named: the calls come at once (no reasoning first, so the output is bounded by the schemas),
        # unless the prompt already opened the reasoning (then it is closed first)
        think = _REASONING if open_think else "think? "
        body = (think + "TEXT? section?") if not forced else (_REASONING if open_think else "") + "section"
        lark = "\n".join([
            f"start: {body}",
            "think: <think> TEXT? </think>",
            f"section: <|tool_calls_section_begin|> {calls} <|tool_calls_section_end|>",
            "call: " + " | ".join(f"call{i}" for i in range(len(tools))),
            *rules,
            "INDEX: /[0-9]{1,3}/",
            _TEXT,
        ])
        return self._matcher(lark)


_REASONING = "TEXT? </think> "  # the rest of a reasoning block the prompt opened
_TEXT = r"TEXT: /(.|\n)+/"


def _arguments_schema(function: dict, forced: bool) -> dict:
    if function.get("strict") or forced:
        return function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
    return {"type": "object"}


def _json(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _COMPACT})
