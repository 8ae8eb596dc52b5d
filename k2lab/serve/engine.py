"""The inference engine: continuous batching of requests over the slots of a preallocated MLA latent cache.

The cache is [layers, slots, max_len, kv_lora_rank + rope] (k2lab.model.mla.LatentCache); a memory budget
fixes slots x max_len. Each step (1) admits waiting requests into free slots, (2) runs prefill chunks of
at most `prefill_chunk` tokens in total (one forward per chunk length: rows of one forward share T), and (3) runs
one decode forward for every request that is generating, each row at its own position of its own slot.
The tokens of every row a forward produced are drawn in one call of the shared sampler (k2lab.model.sampling),
each request from its own seeded generator. The model is reached only through the `CausalLM` methods.
Requests join between steps and leave (freeing their slot) when they finish or are cancelled. With compile=True
the decode forward is the compiled static-shape step of k2lab.model.decode over the same cache, run for the
next power of two of the decoding rows (one graph per bucket, compiled once each; prefill stays eager); the
default is the eager forward, which parity tests compare against. Written by hand
because serving engines (vLLM, SGLang) are not a CPU/laptop-scale library; it follows gpt-fast in size.

Output is streamed per token through the request's callback as `Event`s; stop strings are matched on the
decoded text, and text that may still become a stop string is held back until it cannot.
"""

from __future__ import annotations

import codecs
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from k2lab.config import ModelConfig
from k2lab.model import LatentCache, sample
from k2lab.model.decode import Decoder
from k2lab.serve.sampling import SamplingParams, token_logprobs

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A request the engine cannot take; `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code = status, code


class CausalLM(Protocol):
    """What the engine (and the rollout API) needs of a model; K2ForCausalLM and the multimodal
    K2VLForConditionalGeneration both offer it. Logits [B, T, V] for tokens at `positions` [B, T] of cache slots
    `rows` [B], attending to what those slots hold."""

    config: ModelConfig
    device: torch.device
    dtype: torch.dtype

    def __call__(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, cache: LatentCache | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor: ...
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def new_cache(self, slots: int, max_len: int) -> LatentCache: ...


class Constraint(Protocol):
    """A decoding grammar (see k2lab.serve.grammar): which ids may come next, fed each chosen id."""

    def allowed(self) -> torch.Tensor: ...  # bool [V]
    def accept(self, token: int) -> None: ...
    def finished(self) -> bool: ...


@dataclass
class Event:
    """One streamed step of a request: a token (None on the final event), its new text, logprobs, and
    finish_reason ("stop", "length", "abort" or "error", with `error` saying what failed) on the final event."""

    token: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    constraint: Constraint | None = None
    output: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    embeds: torch.Tensor | None = None  # [T, D] prompt embeddings (image features placed in them), else ids
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot at its next step."""
        self.cancelled = True


class _Decoding:
    """Per-request decode state: generator, token counts for penalties, UTF-8 and stop-string buffers."""

    def __init__(self, req: Request, vocab: int, device: torch.device):
        seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = torch.zeros(vocab, device=device) if req.params.penalized else None
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.sent = 0  # chars of req.text already streamed
        self.hold = max((len(s) for s in req.params.stop), default=1) - 1


class Engine:
    def __init__(self, model: CausalLM, token_bytes: Callable[[int], bytes], eos_ids: tuple[int, ...],
                 max_len: int = 2048, cache_bytes: int = 512 << 20, max_slots: int = 64,
                 prefill_chunk: int = 256, max_queue: int = 1024, compile: bool = False):
        """`token_bytes(id)` gives a token's bytes (special tokens as their text); `eos_ids` end every request.
        Slots = min(max_slots, cache_bytes // (max_len * bytes per cached token)). compile: decode through the
        compiled step (a text model with full-precision experts only)."""
        self.model = model.eval()
        config = model.config
        if max_len > config.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings {config.max_position_embeddings}")
        per_token = config.cache_bytes_per_token(torch.finfo(model.dtype).bits // 8)
        slots = min(max_slots, cache_bytes // (max_len * per_token))
        if slots < 1:
            raise ValueError(f"cache budget {cache_bytes} bytes holds no slot of {max_len} tokens "
                             f"({per_token} bytes per token)")
        self.decoder = Decoder(model, slots, max_len) if compile else None
        self.cache = model.new_cache(slots, max_len) if self.decoder is None else self.decoder.latent
        self.max_len, self.slots, self.prefill_chunk, self.max_queue = max_len, slots, prefill_chunk, max_queue
        self.vocab = config.vocab_size
        self.token_bytes, self.eos_ids = token_bytes, tuple(eos_ids)
        self.device = model.device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free = list(range(slots - 1, -1, -1))
        self.state: dict[int, _Decoding] = {}
        self.lock = threading.Condition()
        self.accepting = True
        self.generated_tokens = 0  # totals for /metrics
        self.prompt_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens/s
        self._thread: threading.Thread | None = None
        self._stop = False
        # held around every forward: a weight reload (k2lab.serve.weights) swaps the weights between steps
        self.weights_lock = threading.Lock()
        # vLLM's --logprobs-mode: "raw_logprobs" (the model's distribution, as OpenAI reports) or
        # "processed_logprobs" (the distribution sampled from, after penalties, temperature, top-k, top-p: RL's)
        self.logprobs_mode = "raw_logprobs"

    # ---- intake ---------------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None] = lambda e: None,
               constraint: Constraint | None = None, embeds: torch.Tensor | None = None) -> Request:
        """Queue a request; raises EngineError (400 context too long, 429 queue full, 503 shutting down).
        embeds [len(prompt), D], when given, are what the prefill feeds instead of the prompt's embeddings."""
        if not prompt:
            raise EngineError("the prompt is empty")
        if any(not 0 <= t < self.vocab for t in prompt):
            raise EngineError(f"prompt token ids must be in [0, {self.vocab})")
        if len(prompt) + params.max_tokens > self.max_len:
            raise EngineError(f"This model's maximum context length is {self.max_len} tokens; the request has "
                              f"{len(prompt)} prompt tokens and max_tokens {params.max_tokens} "
                              f"({len(prompt) + params.max_tokens} in all).", code="context_length_exceeded")
        if embeds is not None and embeds.shape[0] != len(prompt):
            raise EngineError(f"embeds cover {embeds.shape[0]} positions, the prompt has {len(prompt)}")
        req = Request(list(prompt), params, on_event, constraint, embeds=embeds)
        with self.lock:
            if not self.accepting:
                raise EngineError("the server is shutting down", 503, "service_unavailable")
            if len(self.waiting) >= self.max_queue:
                raise EngineError(f"the queue is full ({self.max_queue} waiting requests); retry later", 429,
                                  "rate_limit_exceeded")
            self.waiting.append(req)
            self.lock.notify()
        return req

    def generate(self, prompt: list[int], params: SamplingParams, constraint: Constraint | None = None) -> Request:
        """Run one request to completion (steps the engine inline when no loop thread is running)."""
        req = self.submit(prompt, params, constraint=constraint)
        while not req.done.is_set():
            if self._thread is None:
                self.step()
            else:
                req.done.wait(0.1)
        return req

    # ---- the loop -------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One scheduling step; False when there was nothing to do."""
        with self.lock:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, "abort")
            for req in [r for r in self.running if r.cancelled]:
                self._finish(req, "abort")
            while self.waiting and self.free:
                req = self.waiting.popleft()
                req.slot = self.free.pop()
                self.state[id(req)] = _Decoding(req, self.vocab, self.device)
                self.running.append(req)
        if not self.running:
            return False
        t0, produced = time.perf_counter(), 0
        try:
            with torch.inference_mode(), self.weights_lock:
                produced += self._prefill()
                produced += self._decode()
        except Exception as e:  # a failed forward fails the requests in it, never the engine
            log.exception("engine step failed")
            for req in list(self.running):
                self._finish(req, "error", f"engine error: {e}")
        self._recent.append((time.perf_counter(), produced))
        while self._recent and self._recent[0][0] < t0 - 10.0:
            self._recent.popleft()
        return True

    def _prefill(self) -> int:
        """Next prompt chunks of the prefilling requests, `prefill_chunk` tokens in all; chunks of equal length
        share one forward (rows of a forward share T; each row has its own positions and slot)."""
        budget, groups = self.prefill_chunk, {}
        for req in [r for r in self.running if r.prefilled < len(r.prompt)]:
            if budget <= 0:
                break
            n = min(budget, len(req.prompt) - req.prefilled)
            groups.setdefault(n, []).append(req)
            budget -= n
        produced = 0
        for n, reqs in groups.items():
            ids = torch.tensor([r.prompt[r.prefilled:r.prefilled + n] for r in reqs], device=self.device)
            positions = torch.stack([torch.arange(r.prefilled, r.prefilled + n, device=self.device) for r in reqs])
            slots = torch.tensor([r.slot for r in reqs], device=self.device)
            if any(r.embeds is not None for r in reqs):  # image features sit in these prompts' embeddings
                embeds = self.model.embed(ids)
                for i, r in enumerate(reqs):
                    if r.embeds is not None:
                        embeds[i] = r.embeds[r.prefilled:r.prefilled + n]
                logits = self.model(inputs_embeds=embeds, positions=positions, cache=self.cache, rows=slots)
            else:
                logits = self.model(ids, positions=positions, cache=self.cache, rows=slots)
            self.prompt_tokens += n * len(reqs)
            for req in reqs:
                req.prefilled += n
            ready = [i for i, r in enumerate(reqs) if r.prefilled == len(r.prompt)]
            if ready:
                now = time.perf_counter()
                for i in ready:
                    reqs[i].first_token_time = now
                self._emit([reqs[i] for i in ready], logits[ready, -1])
                produced += len(ready)
        return produced

    def _decode(self) -> int:
        # Requests whose prompt is cached and that have sampled at least one token: feed the last one.
        rows = [r for r in self.running if r.prefilled == len(r.prompt) and r.output and r.finish_reason is None]
        if not rows:
            return 0
        ids = torch.tensor([r.output[-1] for r in rows], device=self.device)
        positions = torch.tensor([len(r.prompt) + len(r.output) - 1 for r in rows], device=self.device)
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        if self.decoder is not None:
            logits = self.decoder.step(ids, positions, rows=slots)
        else:
            logits = self.model(ids[:, None], positions=positions[:, None], cache=self.cache, rows=slots)[:, -1]
        self._emit(rows, logits)
        return len(rows)

    def _emit(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Sample the next token of every request in reqs from its row of logits [N, V] in one batched call
        (each request draws from its own generator), then stream each token."""
        states = [self.state[id(r)] for r in reqs]

        def column(name: str) -> torch.Tensor:
            return torch.tensor([getattr(r.params, name) for r in reqs])

        counts = allowed = None
        if any(st.counts is not None for st in states):
            zeros = torch.zeros(self.vocab, device=self.device)
            counts = torch.stack([zeros if st.counts is None else st.counts for st in states])
        if any(r.constraint is not None for r in reqs):
            everything = torch.ones(self.vocab, dtype=torch.bool)
            allowed = torch.stack([everything if r.constraint is None else r.constraint.allowed()
                                   for r in reqs]).to(self.device)
        bias = None
        if any(r.params.logit_bias for r in reqs):
            bias = torch.zeros(len(reqs), self.vocab, device=self.device)
            for i, r in enumerate(reqs):
                for token, b in r.params.logit_bias:
                    bias[i, token] += b
        uniform = torch.cat([torch.rand(1, generator=st.generator) for st in states])
        tokens, sampled = sample(logits, column("temperature"), column("top_p"), column("top_k"), uniform, counts=counts,
                           frequency_penalty=column("frequency_penalty"), presence_penalty=column("presence_penalty"),
                           bias=bias, allowed=allowed)
        for i, (req, token) in enumerate(zip(reqs, tokens.tolist())):
            self._accept(req, token, logits[i].float(), float(sampled[i]))

    def _accept(self, req: Request, token: int, logits: torch.Tensor, sampled_logprob: float) -> None:
        """Record and stream req's next token (logprobs from its raw logits [V], or the sampler's in
        processed_logprobs mode); finish req if it is done."""
        st, p = self.state[id(req)], req.params
        logprob = top = None
        if p.logprobs is not None and self.logprobs_mode == "processed_logprobs":
            logprob, top = sampled_logprob, []  # alternatives are refused in this mode (k2lab.serve.server)
        elif p.logprobs is not None:
            logprob, top = token_logprobs(logits.log_softmax(-1), token, p.logprobs)
        req.output.append(token)
        self.generated_tokens += 1
        if st.counts is not None:
            st.counts[token] += 1
        if req.constraint is not None:
            req.constraint.accept(token)
        if token in self.eos_ids or token in p.stop_token_ids:
            self._send(req, Event(token, "", logprob, top))
            self._finish(req, "stop")
            return
        req.text += st.utf8.decode(self.token_bytes(token))
        stop_at = min((i for i in (req.text.find(s, max(0, st.sent - st.hold)) for s in p.stop) if i >= 0),
                      default=-1)
        if stop_at >= 0:
            req.text = req.text[:stop_at]
            self._send(req, Event(token, self._take(req, len(req.text)), logprob, top))
            st.utf8.reset()  # bytes after the stop string are dropped
            self._finish(req, "stop")
            return
        self._send(req, Event(token, self._take(req, len(req.text) - st.hold), logprob, top))
        if len(req.output) >= p.max_tokens:
            self._finish(req, "length")
        elif req.constraint is not None and req.constraint.finished():
            self._finish(req, "stop")

    def _take(self, req: Request, upto: int) -> str:
        st = self.state[id(req)]
        upto = max(upto, st.sent)
        piece, st.sent = req.text[st.sent:upto], upto
        return piece

    def _send(self, req: Request, event: Event) -> None:
        try:
            req.on_event(event)
        except Exception:  # a broken consumer (closed event loop) cancels its own request only
            log.exception("request callback failed; cancelling the request")
            req.cancelled = True

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.done.is_set():
            return
        req.finish_reason = reason
        st = self.state.pop(id(req), None)
        rest = ""
        if st is not None and error is None:
            req.text += st.utf8.decode(b"", final=True)  # a cut-off UTF-8 character becomes U+FFFD
            rest = req.text[st.sent:]
        if req in self.running:
            self.running.remove(req)
            self.free.append(req.slot)
        self._send(req, Event(None, rest, finish_reason=reason, error=error))
        req.done.set()

    # ---- thread + shutdown ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop on a background thread (the server's mode)."""
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="k2lab-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            if not self.step():
                with self.lock:
                    if not self.waiting and not self._stop:
                        self.lock.wait(0.05)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with drain, let in-flight ones finish (else abort them); stop the thread."""
        with self.lock:
            self.accepting = False
            if not drain:
                for req in list(self.waiting) + self.running:
                    req.cancel()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.waiting or self.running:
            if deadline is not None and time.monotonic() > deadline:
                for req in list(self.waiting) + self.running:
                    req.cancel()
                deadline = None
            if self._thread is None:
                self.step()
            else:
                time.sleep(0.01)
        self._stop = True
        if self._thread is not None:
            with self.lock:
                self.lock.notify()
            self._thread.join()
            self._thread = None

    # ---- numbers for /metrics -------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        window = list(self._recent)
        span = window[-1][0] - window[0][0] if len(window) > 1 else 0.0
        rate = sum(n for _, n in window[1:]) / span if span > 0 else 0.0
        cached = sum(r.prefilled + len(r.output) for r in self.running)
        return {"queue_depth": len(self.waiting), "running_requests": len(self.running),
                "generation_tokens_per_second": rate, "cache_slots_total": self.slots,
                "cache_slots_used": self.slots - len(self.free),
                "cache_usage_ratio": cached / (self.slots * self.max_len),
                "generated_tokens_total": self.generated_tokens, "prompt_tokens_total": self.prompt_tokens}
