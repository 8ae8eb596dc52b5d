"""Shared by the server tests: a tiny checkpoint trained briefly with `k2lab pretrain`, a server on a free
loopback port, and a scripted model (a test double for the network)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import torch

from k2lab.model import K2ForCausalLM
from k2lab.serve.engine import Engine
from k2lab.serve.server import Server, build_server, serve_in_thread
from k2lab.tokenizer import Tokenizer
from tests.conftest import tiny_config

VOCAB = 1024


def tiny_model_config(tok: Tokenizer, **kw):
    return tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id, max_position_embeddings=1024, **kw)


def make_checkpoint(run_dir: Path, steps: int = 8) -> Path:
    """`k2lab pretrain` (the function the command calls) on the tiny preset for a few AdamW steps on the
    embedded corpus; returns its checkpoint directory (weights + tokenizer files)."""
    from k2lab.train.pretrain import PretrainSettings, pretrain
    from k2lab.train.checkpoint import checkpoint_dirs

    pretrain(PretrainSettings(preset="tiny", optimizer="adamw", max_steps=steps, seq_len=64, batch_size=4,
                              warmup_steps=2, eval_every=1000, val_rows=4, run_dir=str(run_dir)))
    return checkpoint_dirs(run_dir)[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_server(path: Path, **kw) -> Server:
    return build_server(path, **{"max_len": 256, "cache_mb": 16, "max_slots": 16, **kw})


class ScriptedModel(torch.nn.Module):
    """A TEST DOUBLE for the network: it emits `script` token by token after any prompt (a one-hot logit
    at the next script position), so the engine, server, chat template and tool-call parser run for real
    on an output we choose. One request at a time (it keys on the prompt length of the last prefill)."""

    def __init__(self, config, script: list[int], delay: float = 0.0):
        super().__init__()
        self.config, self.script, self.delay = config, script, delay
        self.device, self.dtype = torch.device("cpu"), torch.float32  # the engine's model interface
        self.prompt_len = 0

    def new_cache(self, slots, max_len, dtype=None):
        return K2ForCausalLM.new_cache.__get__(self)(slots, max_len, dtype)

    def forward(self, ids, positions, cache, rows):
        time.sleep(self.delay)  # lets a test act while a request is still generating
        if int(positions[0, 0]) == 0:
            self.prompt_len = ids.shape[1]
        bsz, t = ids.shape
        logits = torch.zeros(bsz, t, self.config.vocab_size)
        for b in range(bsz):
            k = int(positions[b, -1]) - self.prompt_len + 1  # how many tokens were generated before this one
            logits[b, -1, self.script[min(k, len(self.script) - 1)]] = 100.0  # chosen at any temperature
        return logits


def scripted_server(tok: Tokenizer, text: str, delay: float = 0.0) -> Server:
    script = tok.encode(text, allow_special=True) + [tok.im_end_id]
    model = ScriptedModel(tiny_model_config(tok), script, delay)
    engine = Engine(model, tok.id_to_bytes, (tok.eos_id, tok.im_end_id), max_len=1024, max_slots=2,
                    prefill_chunk=10_000)
    return Server(engine, tok, "scripted")
