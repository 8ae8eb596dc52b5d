"""RL rollouts in process: many prompts x K samples, token ids in, token ids and log-probabilities out.

The in-process backend of the one generator interface RL uses (the other backend is an OpenAI-compatible
server). It holds the model object itself, never a copy, so an optimizer step that changes the weights in place
is seen by the next call; the caller bumps `policy_version` after each update and every sample records the
version it was drawn under. Text is never involved: prompts are token ids, completions are token ids.

One call is one static batch (the engine's continuous batching and streaming buy nothing here: every sample
starts together). Each prompt is prefilled once into the first of its K cache slots and its latent cache copied
into the other K-1; then every unfinished sample decodes one token per forward, each at its own position:
through the compiled static-shape step of k2lab.model.decode (one graph per batch-size bucket, reused by every
later call of that size) with compile=True, or the model's eager cached forward (the default, which parity
tests compare against). A compile costs 40-160 s on this loaded 2-core machine (warm or cold inductor cache)
and then halves each call at the RL recipe's sizes (bench/compile_cost.py), so a caller making many calls (an
RL run: `k2lab rl` compiles by default) turns it on and a one-off call (an eval) does not. The choice is
fixed per generator, never switched on measured time, so that a run and its resumption draw the same samples.
The
tokens are drawn by the shared sampler (k2lab.model.sampling), whose log-probabilities are those of the
distribution actually sampled from (after temperature, top-k, top-p): the behaviour policy an RL loss needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from k2lab.model import LatentCache, sample
from k2lab.model.decode import compilable, decoder_for
from k2lab.serve.engine import CausalLM
from k2lab.serve.sampling import MAX_TOP_K


@dataclass(frozen=True)
class RolloutParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    stop_token_ids: tuple[int, ...] = ()  # end a sample like EOS does (the stop id is kept in the completion)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.top_k <= MAX_TOP_K, f"top_k must be in [0, {MAX_TOP_K}], got {self.top_k}"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class RolloutSample:
    """Sample `sample_index` of prompt `prompt_index`. logprobs[i] is log pi(completion_ids[i] | prefix) under
    the sampling policy (0.0 at temperature 0); finish_reason is "stop" (an EOS or stop id, which is the last
    completion id) or "length" (max_new_tokens reached)."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int


class InProcessGenerator:
    def __init__(self, model: CausalLM, eos_ids: Sequence[int] = (), policy_version: int = 0,
                 compile: bool = False):
        """eos_ids end every sample with finish_reason "stop" (the tokenizer's EOS and end-of-turn ids).
        compile: decode through the compiled step where the model allows it (a text model with full-precision
        experts; others decode eagerly)."""
        self.model = model
        self.eos_ids = tuple(eos_ids)
        self.policy_version = policy_version
        self.compile = compile and compilable(model)

    def _check(self, prompts: Sequence[Sequence[int]], k: int, params: RolloutParams) -> None:
        vocab, limit = self.model.config.vocab_size, self.model.config.max_position_embeddings
        if not prompts or k < 1:
            raise ValueError(f"need at least one prompt and k >= 1, got {len(prompts)} prompts and k={k}")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if any(not 0 <= t < vocab for t in p):
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
            if len(p) + params.max_new_tokens > limit:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {params.max_new_tokens} exceeds "
                                 f"the model's {limit} positions; shorten the prompt or lower max_new_tokens")

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], k: int = 1,
                 params: RolloutParams = RolloutParams()) -> list[RolloutSample]:
        """k samples of every prompt, prompt-major (sample j of prompt i is at i * k + j). The same prompts,
        k, params and weights give the same samples."""
        self._check(prompts, k, params)
        model, device, steps = self.model, self.model.device, params.max_new_tokens
        version = self.policy_version
        n = len(prompts) * k
        lengths = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(k)
        max_len = max(len(p) for p in prompts) + steps
        decoder = decoder_for(model, n, max_len) if self.compile else None
        cache = model.new_cache(n, max_len) if decoder is None else decoder.latent
        logits = self._prefill(prompts, k, cache).repeat_interleave(k, dim=0)  # [n, V]

        stop_ids = torch.tensor(sorted(set(self.eos_ids) | set(params.stop_token_ids)), dtype=torch.long,
                                device=device)
        generator = torch.Generator(device=device).manual_seed(params.seed)
        tokens = torch.zeros(n, steps, dtype=torch.long, device=device)
        logprobs = torch.zeros(n, steps, device=device)
        produced = torch.full((n,), steps, device=device)
        stopped = torch.zeros(n, dtype=torch.bool, device=device)
        active = torch.arange(n, device=device)  # samples still generating; sample r lives in cache slot r
        for step in range(steps):
            # every sample draws every step, finished or not, so its draws depend on the seed and its index only
            uniform = torch.rand(n, generator=generator, device=device)[active]
            token, logprob = sample(logits, params.temperature, params.top_p, params.top_k, uniform)
            tokens[active, step], logprobs[active, step] = token, logprob
            ended = torch.isin(token, stop_ids)
            if bool(ended.any()):
                produced[active[ended]], stopped[active[ended]] = step + 1, True
                active, token = active[~ended], token[~ended]
            if step + 1 == steps or active.numel() == 0:
                break
            positions = lengths[active] + step
            if decoder is None:
                logits = model(token[:, None], positions=positions[:, None], cache=cache, rows=active)[:, -1]
            else:  # every slot steps (one compiled shape); finished ones at position 0, their logits dropped
                every, where = torch.zeros_like(lengths), torch.zeros_like(lengths)
                every[active], where[active] = token, positions
                logits = decoder.step(every, where)[active]

        tokens, logprobs, produced, stopped = tokens.tolist(), logprobs.tolist(), produced.tolist(), stopped.tolist()
        return [RolloutSample(r // k, r % k, list(prompts[r // k]), tokens[r][:int(produced[r])],
                              logprobs[r][:int(produced[r])], "stop" if stopped[r] else "length", version)
                for r in range(n)]

    def _prefill(self, prompts: Sequence[Sequence[int]], k: int, cache: LatentCache) -> torch.Tensor:
        """Prefill each prompt once into slot i * k (prompts of one length share a forward), copy its latent cache
        into slots i * k + 1 .. i * k + k - 1, and return each prompt's next-token logits [P, V]."""
        device = self.model.device
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        last = [None] * len(prompts)
        for t, idx in by_length.items():
            ids = torch.tensor([list(prompts[i]) for i in idx], device=device)
            positions = torch.arange(t, device=device).expand(len(idx), t)
            first = torch.tensor(idx, device=device) * k
            out = self.model(ids, positions=positions, cache=cache, rows=first)[:, -1]
            for j, i in enumerate(idx):
                last[i] = out[j]
            if k > 1:  # each layer's cache is [slots, positions, width]: copy the prompt's positions
                siblings = (first[:, None] + torch.arange(1, k, device=device)).flatten()
                for kv in cache.kv:
                    kv[siblings, :t] = kv[first.repeat_interleave(k - 1), :t]
        return torch.stack(last)
