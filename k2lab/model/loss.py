"""The lm_head + next-token cross-entropy in chunks of tokens, without the [tokens, vocab] logits.

`F.cross_entropy(lm_head(h))` keeps the whole logits tensor [N, V] (fp32) for the backward and builds another
[N, V] for its gradient: 2 x 134 MB for `tiny` at 8x512 tokens, 2 x 21 GB for K2's vocabulary. Here each chunk of
tokens gets its logits [chunk, V], its loss, and at once its share of the gradients (d h and d W of the head), so
a [chunk, V] buffer is the largest thing the head ever allocates. Computing the gradients in the forward keeps
the head at three matmuls (as unchunked); recomputing the logits in the backward would cost a fourth. The
backward only scales the stored gradients by the incoming scalar gradient.

Only tokens that count (mask true, target not ignore_index) go through the head at all: prompt tokens masked out
in SFT cost nothing. Matmuls run in the hidden states' dtype (bf16 under autocast); the log-sum-exp, the loss and
the gradient accumulation in fp32.
"""

from __future__ import annotations

import torch


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk: ~4M logits (16 MB fp32), at least 64 tokens so each matmul stays efficient."""
    return max(64, (1 << 22) // vocab_size)


def _head_chunks(h, weight, targets, token_weight, chunk_size, need_grad):
    """h [N, D], weight [V, D], targets [N] (counted rows only), token_weight [N] (each row's weight in the
    loss) -> (per-token losses [N] fp32, and if need_grad the loss's gradients w.r.t. h and weight, else None)."""
    w = weight.to(h.dtype)
    losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad else None
    for start in range(0, h.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h_c, t_c = h[rows], targets[rows]
        logits = (h_c @ w.T).float()  # [chunk, V]: the only vocab-sized buffer
        target_logit = logits.gather(1, t_c[:, None])[:, 0]
        peak = logits.amax(dim=-1, keepdim=True)
        probs = logits.sub_(peak).exp_()  # in place: one exp pass serves the loss and the gradient
        total = probs.sum(dim=-1)
        losses[rows] = total.log() + peak[:, 0] - target_logit
        if need_grad:  # d loss / d logits = softmax - onehot, weighted per token
            weight_c = token_weight[rows]
            probs.mul_((weight_c / total)[:, None])
            probs[torch.arange(len(t_c), device=h.device), t_c] -= weight_c
            dlogits = probs.to(h.dtype)
            torch.mm(dlogits, w, out=grad_h[rows])
            if grad_w.dtype == h.dtype:
                grad_w.addmm_(dlogits.T, h_c)
            else:  # bf16 matmul, fp32 accumulation over chunks
                grad_w += dlogits.T @ h_c
    return losses, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, token_weight, chunk_size):
        losses, *ctx.grads = _head_chunks(h, weight, targets, token_weight, chunk_size, need_grad=True)
        ctx.mark_non_differentiable(losses)
        return (losses * token_weight).sum(), losses

    @staticmethod
    def backward(ctx, grad_loss, _grad_losses):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        return (grad_h * grad_loss if ctx.needs_input_grad[0] else None,
                grad_w * grad_loss if ctx.needs_input_grad[1] else None, None, None, None)


class _ChunkedTokenLosses(torch.autograd.Function):
    """Per-token losses that take any gradient: the backward recomputes each chunk's logits (a fourth matmul)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size):
        ctx.save_for_backward(h, weight, targets)
        ctx.chunk_size = chunk_size
        return _head_chunks(h, weight, targets, None, chunk_size, need_grad=False)[0]

    @staticmethod
    def backward(ctx, grad_losses):
        h, weight, targets = ctx.saved_tensors
        _, grad_h, grad_w = _head_chunks(h, weight, targets, grad_losses.float(), ctx.chunk_size, need_grad=True)
        return (grad_h if ctx.needs_input_grad[0] else None, grad_w if ctx.needs_input_grad[1] else None, None, None)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          mask: torch.Tensor | None = None, ignore_index: int = -100,
                          normalizer: float | torch.Tensor | None = None, chunk_size: int | None = None,
                          token_gradients: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of `h @ weight.T` against `targets`, in chunks of tokens.

    h [..., D] hidden states, weight [V, D] (the lm_head), targets [...] token ids; mask [...] (true/1 = counts)
    and targets == ignore_index leave a token out. Returns (loss, token_losses): loss = the sum of the counted
    tokens' losses / normalizer (default: their number, i.e. the mean; a training loop that averages over several
    micro-batches passes the step's token count; 0 when no token counts), differentiable w.r.t. h and weight;
    token_losses [...] fp32, 0 where a token does not count. token_losses carry gradients only with
    token_gradients=True (for a caller that weights them itself; the backward then recomputes the logits, four
    matmuls instead of three); otherwise the gradients of `loss` are computed in the forward and token_losses are
    detached.
    """
    if h.shape[:-1] != targets.shape or (mask is not None and mask.shape != targets.shape):
        raise ValueError(f"hidden states {tuple(h.shape)}, targets {tuple(targets.shape)} and mask "
                         f"{None if mask is None else tuple(mask.shape)} must agree on the token dimensions")
    valid = targets != ignore_index
    if mask is not None:
        valid &= mask.bool()
    rows = valid.flatten().nonzero()[:, 0]
    n = rows.numel() if normalizer is None else normalizer
    h_valid = h.reshape(-1, h.shape[-1])[rows]
    # under autocast the matmuls run in the autocast dtype; the Function itself sees plain tensors
    if torch.is_autocast_enabled(h.device.type):
        h_valid = h_valid.to(torch.get_autocast_dtype(h.device.type))
    token_weight = torch.full((rows.numel(),), 1.0, dtype=torch.float32, device=h.device) / n
    args = (h_valid, weight, targets.flatten()[rows], token_weight, chunk_size or default_chunk_size(weight.shape[0]))
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        with torch.autocast(h.device.type, enabled=False):
            if token_gradients:
                losses = _ChunkedTokenLosses.apply(*args[:3], args[4])
                loss = (losses * token_weight).sum()
            else:
                loss, losses = _ChunkedLinearCrossEntropy.apply(*args)
    else:  # evaluation: no gradients computed or kept
        losses = _head_chunks(*args, need_grad=False)[0]
        loss = (losses * token_weight).sum()
    token_losses = torch.zeros(targets.numel(), dtype=torch.float32, device=h.device).index_copy(0, rows, losses)
    return loss, token_losses.view(targets.shape)
