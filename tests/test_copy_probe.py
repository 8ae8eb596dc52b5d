"""The in-context copying probe's bookkeeping (k2lab.evals.copying), on hand-built logit functions standing in for a
model (the probe is what is under test): an oracle copier, a model that ignores context, and an off-by-one copier."""

from __future__ import annotations

import math

import pytest
import torch

from k2lab.evals.copying import copy_probe

V, SPAN = 50, 16


class Copier(torch.nn.Module):
    """Logits that put all mass on the token `lag` positions back (the copy of a span of length lag)."""

    def __init__(self, lag: int):
        super().__init__()
        self.lag = lag

    def forward(self, x):
        logits = torch.zeros(*x.shape, V)
        for p in range(x.shape[1]):
            if p + 1 - self.lag >= 0:
                logits[:, p].scatter_(1, x[:, p + 1 - self.lag][:, None], 30.0)
        return logits


def rows(n=4, length=SPAN + 3):
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(0))


def test_a_copier_predicts_the_repeat_and_not_the_first_reading():
    r = copy_probe(Copier(SPAN), rows(), SPAN)
    assert r["repeat_nll"] < 1e-6 and r["repeat_top1"] == 1.0 and r["first_top1"] < 0.2
    # nothing to copy from on the first reading
    assert r["first_nll"] == pytest.approx(math.log(V)) and r["rows"] == 4 and r["span"] == SPAN


def test_a_model_that_ignores_context_gains_nothing_from_the_repeat():
    uniform = lambda x: torch.zeros(*x.shape, V)  # noqa: E731
    r = copy_probe(uniform, rows(), SPAN)
    assert r["first_nll"] == pytest.approx(math.log(V)) and r["repeat_nll"] == pytest.approx(math.log(V))


def test_copying_from_the_wrong_offset_does_not_count():
    r = copy_probe(Copier(SPAN - 1), rows(), SPAN)
    assert r["repeat_top1"] < 0.3 and r["repeat_nll"] > 5


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match="need token rows"):
        copy_probe(Copier(SPAN), rows(length=SPAN - 1), SPAN)
