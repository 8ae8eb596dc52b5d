"""The chunked lm_head + cross-entropy equals F.cross_entropy(lm_head(h)) in value and gradients, with masks and
ignored tokens, on the real tiny model; and never allocates a [tokens, vocab] buffer."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from k2lab.config import ModelConfig
from k2lab.model import K2ForCausalLM
from k2lab.model.loss import chunked_cross_entropy


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return K2ForCausalLM(ModelConfig.preset("tiny"))


def hidden_and_targets(model, bsz=2, t=61):
    ids = torch.randint(0, model.config.vocab_size, (bsz, t + 1))
    with torch.no_grad():
        h = model.model(ids[:, :-1])
    return h, ids[:, 1:]


def reference(model, h, targets, keep):
    """Unchunked: full logits, F.cross_entropy over the kept tokens."""
    logits = model.lm_head(h)
    return F.cross_entropy(logits[keep], targets[keep]), F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape) * keep


def grads(loss, h, weight):
    gh, gw = torch.autograd.grad(loss, (h, weight))
    return gh, gw


@pytest.mark.parametrize("chunk_size", [16, 37, 4096])
def test_equals_cross_entropy_with_mask(tiny, chunk_size):
    h, targets = hidden_and_targets(tiny)
    mask = torch.rand(targets.shape) > 0.3
    h = h.requires_grad_()
    ref, ref_tokens = reference(tiny, h, targets, mask)
    ours, tokens = chunked_cross_entropy(h, tiny.lm_head.weight, targets, mask, chunk_size=chunk_size)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(tokens, ref_tokens.detach(), atol=1e-5)
    for a, b in zip(grads(ours, h, tiny.lm_head.weight), grads(ref, h, tiny.lm_head.weight)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
        assert a.abs().max() > 0


def test_ignore_index_and_normalizer(tiny):
    h, targets = hidden_and_targets(tiny)
    targets = targets.clone()
    targets[0, :10] = -100
    keep = targets != -100
    ref, _ = reference(tiny, h, targets, keep)
    ours, tokens = chunked_cross_entropy(h, tiny.lm_head.weight, targets, chunk_size=50)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert (tokens[0, :10] == 0).all() and (tokens[keep] > 0).all()
    # a loop that averages over several micro-batches divides by the step's token count instead
    scaled, _ = chunked_cross_entropy(h, tiny.lm_head.weight, targets, normalizer=1000.0, chunk_size=50)
    assert scaled.item() == pytest.approx(ref.item() * keep.sum().item() / 1000.0, rel=1e-5)


def test_model_loss_matches_logits_with_documents(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 41))
    docs = torch.tensor([[0] * 15 + [1] * 25, [0] * 40])
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 14] = False  # the token that would predict across the document boundary
    params = list(tiny.parameters())
    loss, _ = tiny.loss(ids[:, :-1], ids[:, 1:], mask=mask, document_ids=docs)
    ours = torch.autograd.grad(loss, params, allow_unused=True)
    logits = tiny(ids[:, :-1], document_ids=docs)
    ref = F.cross_entropy(logits[mask], ids[:, 1:][mask])
    theirs = torch.autograd.grad(ref, params, allow_unused=True)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    for a, b in zip(ours, theirs):
        if b is None:
            assert a is None
        else:
            assert torch.allclose(a, b, atol=1e-5, rtol=0)


class LargestBuffer(TorchDispatchMode):
    """Records the largest tensor any op allocates (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:  # views and in-place results share an input's storage: no allocation
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tokens_by_vocab_buffer(tiny):
    h, targets = hidden_and_targets(tiny, bsz=4, t=512)
    n, (v, d) = targets.numel(), tiny.lm_head.weight.shape
    h.requires_grad_()
    with LargestBuffer() as full:
        F.cross_entropy(tiny.lm_head(h).flatten(0, 1), targets.flatten()).backward()
    with LargestBuffer() as chunked:
        chunked_cross_entropy(h, tiny.lm_head.weight, targets, chunk_size=128)[0].backward()
    assert full.largest == n * v
    assert chunked.largest == max(128 * v, v * d)  # a chunk's logits, or the head weight's gradient
    assert chunked.largest * 8 <= full.largest


def test_bf16_autocast_close_to_fp32(tiny):
    h, targets = hidden_and_targets(tiny)
    fp32, _ = chunked_cross_entropy(h, tiny.lm_head.weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _ = chunked_cross_entropy(h, tiny.lm_head.weight, targets)
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=1e-2)


def test_shape_mismatch_is_refused(tiny):
    h, targets = hidden_and_targets(tiny)
    with pytest.raises(ValueError, match="must agree"):
        chunked_cross_entropy(h, tiny.lm_head.weight, targets[:, :-1])


def test_no_grad_computes_no_gradients(tiny):
    h, targets = hidden_and_targets(tiny)
    with torch.no_grad():
        ref, _ = reference(tiny, h, targets, torch.ones_like(targets, dtype=torch.bool))
        with LargestBuffer() as mode:
            loss, _ = chunked_cross_entropy(h, tiny.lm_head.weight, targets, chunk_size=16)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert mode.largest == 16 * tiny.config.vocab_size  # no [V, D] weight gradient was built


def test_token_gradients_take_any_weighting(tiny):
    """With token_gradients=True the per-token losses backpropagate like F.cross_entropy(reduction="none"), under
    any per-token weights (a loop that masks and normalizes them itself)."""
    h, targets = hidden_and_targets(tiny)
    h = h.requires_grad_()
    weights = torch.rand(targets.shape)
    ref = F.cross_entropy(tiny.lm_head(h).flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    _, tokens = chunked_cross_entropy(h, tiny.lm_head.weight, targets, chunk_size=40, token_gradients=True)
    assert torch.allclose(tokens, ref, atol=1e-5)
    ours = grads((tokens * weights).sum(), h, tiny.lm_head.weight)
    for a, b in zip(ours, grads((ref * weights).sum(), h, tiny.lm_head.weight)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    _, detached = chunked_cross_entropy(h, tiny.lm_head.weight, targets)
    assert not detached.requires_grad


def test_training_loop_on_the_chunked_head_equals_the_logits_loss(tmp_path):
    """The loop's default loss (model.loss, chunked) against the loss it replaced (full logits, F.cross_entropy,
    masked mean) passed as a custom loss_fn: the same per-step losses, validation loss and trained weights over 3
    steps with masks, packed documents and gradient accumulation."""
    from k2lab.train.loop import train
    from k2lab.train.settings import TrainSettings
    from tests.conftest import random_model, tiny_config

    def logits_losses(model, tokens, document_ids=None):
        logits = model(tokens[:, :-1], document_ids=None if document_ids is None else document_ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(
            tokens.shape[0], -1)

    g = torch.Generator().manual_seed(0)
    data = [{"tokens": torch.randint(0, 512, (4, 33), generator=g),
             "loss_mask": (torch.rand(4, 32, generator=g) > 0.3).float(),
             "document_ids": torch.cat([torch.zeros(4, 20, dtype=torch.long), torch.ones(4, 13, dtype=torch.long)],
                                       1)} for _ in range(3)]
    s = TrainSettings(batch_size=4, grad_accum=2, max_steps=3, warmup_steps=1, optimizer="adamw", lr=1e-2,
                      eval_every=3)
    runs = {}
    for name, kw in {"chunked": {}, "logits": {"loss_fn": logits_losses}}.items():
        kept = []
        last = train(s, tmp_path / name, lambda: random_model(tiny_config(num_hidden_layers=2), seed=4),
                     data.__getitem__, val=data[0], on_model=kept.append, **kw)
        steps = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([r["loss"] for r in steps], last["val_loss"], kept[0].state_dict())
    (a_loss, a_val, a_w), (b_loss, b_val, b_w) = runs["chunked"], runs["logits"]
    assert a_loss == pytest.approx(b_loss, rel=1e-5) and a_val == pytest.approx(b_val, rel=1e-5)
    # weights within 5e-5 after three AdamW steps of ~1e-2 each: Adam divides by sqrt(v), so the rounding of
    # near-zero gradients (lm_head rows of unseen tokens) reaches the weights at ~1e-5
    assert all(torch.allclose(a_w[k], b_w[k], rtol=1e-4, atol=5e-5) for k in a_w)
    assert not torch.equal(a_w["lm_head.weight"], random_model(tiny_config(num_hidden_layers=2),
                                                               seed=4).lm_head.weight)  # it did train
