"""Shared by the server tests: a tiny trained checkpoint, a server on a free loopback port, a scripted model.

`k2lab pretrain` (branch muon) has not landed here yet, so `tiny_checkpoint` trains the tiny model itself for a
few AdamW steps (15: the shared test CPU is slow) on chat-formatted text with the real tokenizer, then saves it as a checkpoint directory.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn

from k2lab import save_model
from k2lab.model import K2ForCausalLM
from k2lab.serve.engine import Engine
from k2lab.serve.server import Server, build_server, create_app
from k2lab.tokenizer import Tokenizer, train_tokenizer
from k2lab.tokenizer.chat import render
from tests.conftest import tiny_config

VOCAB = 1024
# On the shared, loaded 2-core test machine two OpenMP threads wait on each other (decode ran ~20x slower).
torch.set_num_threads(1)
CONVERSATIONS = [
    ([{"role": "user", "content": "What is the weather in Paris?"}],
     {"role": "assistant", "content": "", "tool_calls": [
         {"id": "functions.get_weather:0", "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}),
    ([{"role": "user", "content": "Say hello."}], {"role": "assistant", "content": "Hello! How can I help you?"}),
    ([{"role": "user", "content": "Count to five."}], {"role": "assistant", "content": "one two three four five"}),
]


def tiny_model_config(tok: Tokenizer, **kw):
    return tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id, max_position_embeddings=1024, **kw)


def make_checkpoint(path: Path, steps: int = 15, seed: int = 0) -> Path:
    """Train tokenizer + tiny model briefly (AdamW) on chat text and save both to `path`."""
    torch.manual_seed(seed)
    tok = train_tokenizer(VOCAB, max_bytes=300_000)
    model = K2ForCausalLM(tiny_model_config(tok))
    texts = [render(msgs + [reply]) for msgs, reply in CONVERSATIONS]
    data = [tok.encode(t, allow_special=True) for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        ids = torch.tensor(data[step % len(data)])[None]
        loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_model(model, path)
    tok.save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(server: Server):
    """Run the app with uvicorn on a thread; yields the base URL (…/v1)."""
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        uv.should_exit = True
        thread.join(30)


def checkpoint_server(path: Path, **kw) -> Server:
    return build_server(path, **{"max_len": 256, "cache_mb": 16, "max_slots": 16, **kw})


class ScriptedModel(torch.nn.Module):
    """A TEST DOUBLE for the network: it emits `script` token by token after any prompt (a one-hot logit
    at the next script position), so the engine, server, chat template and tool-call parser run for real
    on an output we choose. One request at a time (it keys on the prompt length of the last prefill)."""

    def __init__(self, config, script: list[int], delay: float = 0.0):
        super().__init__()
        self.config, self.script, self.delay = config, script, delay
        self.lm_head = torch.nn.Linear(1, 1, bias=False)
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
            logits[b, -1, self.script[min(k, len(self.script) - 1)]] = 1.0
        return logits


def scripted_server(tok: Tokenizer, text: str, delay: float = 0.0) -> Server:
    script = tok.encode(text, allow_special=True) + [tok.im_end_id]
    model = ScriptedModel(tiny_model_config(tok), script, delay)
    engine = Engine(model, tok.id_to_bytes, (tok.eos_id, tok.im_end_id), max_len=1024, max_slots=2,
                    prefill_chunk=10_000)
    return Server(engine, tok, "scripted")
