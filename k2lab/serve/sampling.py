"""Per-request sampling: OpenAI's parameters applied to one row of logits.

Order (as in vLLM): frequency/presence penalties and logit_bias on the raw logits, then the grammar mask, then greedy
(temperature 0) or temperature -> top-k -> top-p -> a draw from the request's own seeded generator, so a
request's tokens never depend on what else is in the batch. Logprobs are those of the model's raw distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily, as in vLLM (logits / 1e-300 would overflow)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; n: the chosen token's logprob and the n most likely alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), OpenAI's logit_bias

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (0.0 <= self.temperature <= 2.0, f"temperature must be in [0, 2], got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (len(self.stop) <= 4, f"at most 4 stop strings, got {len(self.stop)}"),
            (all(-100 <= b <= 100 for _, b in self.logit_bias), "logit_bias values must be in [-100, 100]"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def choose(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None,
           allowed: torch.Tensor | None, generator: torch.Generator) -> int:
    """One token id from fp32 logits [V]; counts [V] are how often each id was generated so far,
    allowed [V] bool is the grammar mask (None: all)."""
    if params.penalized and counts is not None:
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        logits = logits.index_add(0, torch.tensor(ids, device=logits.device),
                                  torch.tensor(bias, dtype=logits.dtype, device=logits.device))
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p
        keep[0] = True  # the most likely token always stays (a top_p below fp32's smallest value compares as 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p * keep)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logprobs: torch.Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's logprob and the n most likely (id, logprob) under logprobs [V]."""
    top = logprobs.topk(n) if n else None
    alts = [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)]
    return float(logprobs[token]), alts
