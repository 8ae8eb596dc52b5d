"""Tokenizer, K2 chat format, tool-call parsing, SFT loss masks."""

from k2lab.tokenizer.tokenizer import IncrementalDecoder, Tokenizer
from k2lab.tokenizer.train import train_tokenizer

__all__ = ["IncrementalDecoder", "Tokenizer", "train_tokenizer"]
