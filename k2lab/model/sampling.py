"""The one batched sampler: `generate`, the serving engine and the RL rollout API all draw tokens here.

Order (as in vLLM): frequency/presence penalties and logit bias on the raw logits, then the allowed-token mask (a grammar), then
greedy (temperature 0) or temperature -> top-k -> top-p -> an inverse-CDF draw with one uniform per row. The
caller supplies the uniforms, so each row can have its own seeded generator (a request's tokens then never
depend on what else is in the batch) and this function stays pure. Every parameter is a scalar or one value
per row. The returned log-probability is that of the drawn token under the distribution actually sampled from
(after temperature, top-k and top-p): what an RL loss needs as the behaviour policy; 0 for greedy rows.
"""

from __future__ import annotations

import torch

Rows = float | int | torch.Tensor  # a scalar for every row, or a [B] tensor
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily, as in vLLM (logits / 1e-300 would overflow)


def _per_row(x: Rows, b: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(x, dtype=dtype, device=like.device).expand(b)


def sample(logits: torch.Tensor, temperature: Rows = 0.0, top_p: Rows = 1.0, top_k: Rows = 0,
           uniform: torch.Tensor | None = None, *, counts: torch.Tensor | None = None,
           frequency_penalty: Rows = 0.0, presence_penalty: Rows = 0.0,
           bias: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B] and their sampling log-probabilities [B] (fp32) from logits [B, V].

    uniform [B] in [0, 1) is each row's random draw (needed unless every row is greedy); top_k 0 means no cut;
    counts [B, V] are how often each id was generated so far (for the penalties); bias [B, V] is added to the
    logits (OpenAI's logit_bias); allowed [B, V] bool masks the ids a grammar permits. Temperatures below
    GREEDY_BELOW decode greedily."""
    b, v = logits.shape
    logits = logits.float()
    if counts is not None:
        logits = (logits - _per_row(frequency_penalty, b, logits, torch.float32)[:, None] * counts
                  - _per_row(presence_penalty, b, logits, torch.float32)[:, None] * (counts > 0))
    if bias is not None:
        logits = logits + bias
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    temp = _per_row(temperature, b, logits, torch.float32)
    greedy = temp < GREEDY_BELOW
    if bool(greedy.all()):
        return logits.argmax(dim=-1), torch.zeros(b, device=logits.device)
    if uniform is None:
        raise ValueError("sampling at temperature > 0 needs one uniform draw per row")
    z = logits / torch.where(greedy, 1.0, temp)[:, None]
    k = _per_row(top_k, b, logits, torch.long)
    cut = (k > 0) & (k < v)
    if bool(cut.any()):
        kth = z.topk(int(k[cut].max()), dim=-1).values.gather(-1, torch.where(cut, k - 1, 0)[:, None])
        z = z.masked_fill(cut[:, None] & (z < kth), float("-inf"))  # ties with the k-th value stay
    p = _per_row(top_p, b, logits, torch.float32)
    if bool((p < 1).any()):
        sorted_p, order = z.softmax(dim=-1).sort(dim=-1, descending=True)
        keep_sorted = sorted_p.cumsum(-1) - sorted_p < p[:, None]
        keep_sorted[:, 0] = True  # the most likely token always stays (a top_p below fp32's smallest value is 0)
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        z = z.masked_fill(~keep, float("-inf"))
    z_max, mode = z.max(dim=-1, keepdim=True)
    cdf = (z - z_max).exp().cumsum(dim=-1)  # unnormalized: flat across the ids cut above
    total = cdf[:, -1:]
    token = torch.searchsorted(cdf, uniform.to(device=logits.device, dtype=torch.float32)[:, None] * total,
                               right=True).clamp(max=v - 1)
    # u * total can round up to the total (probability < 2^-24), landing past the last kept id: take the mode.
    token = torch.where(torch.isinf(z.gather(-1, token)), mode, token)
    z_token = z.gather(-1, token)
    token_logp = (z_token - z_max - total.log()).squeeze(-1)
    if bool(greedy.any()):
        token = torch.where(greedy[:, None], logits.argmax(dim=-1, keepdim=True), token)
        token_logp = token_logp.masked_fill(greedy, 0.0)
    return token.squeeze(-1), token_logp
