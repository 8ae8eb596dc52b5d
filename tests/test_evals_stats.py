"""Statistics and grade parsing against hand-computed and published values."""

import math
from itertools import combinations

import numpy as np
import pytest

from k2lab.evals.judge import parse_grade, vote
from k2lab.evals.stats import bootstrap_ci, cohen_kappa, confusion_matrix, krippendorff_alpha, pass_at_k


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 5, 2), (10, 3, 10), (4, 4, 2)])
def test_pass_at_k_matches_enumeration(n, c, k):
    # pass@k = P(a random k-subset of the n samples holds at least one correct one), by enumeration
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_cohen_kappa_textbook_example():
    # 50 items; both yes 20, A yes/B no 5, A no/B yes 10, both no 15: p_o = .7, p_e = .5, kappa = .4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert confusion_matrix(a, b, ["y", "n"]) == [[20, 5], [10, 15]]
    assert cohen_kappa(a, a) == 1.0


def test_krippendorff_alpha_published_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units, missing values,
    # nominal alpha = 0.743
    _ = None
    ratings = [[1, 2, 3, 3, 2, 1, 4, 1, 2, _, _, _],
               [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, _, 3],
               [_, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, _],
               [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, _]]
    assert krippendorff_alpha(ratings) == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha([[1, 2, 1], [1, 2, 1]]) == 1.0


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate():
    x = np.array([1] * 30 + [0] * 70)
    lo, hi = bootstrap_ci(x, np.mean, n_boot=500, seed=1)
    assert (lo, hi) == bootstrap_ci(x, np.mean, n_boot=500, seed=1)
    assert lo < 0.3 < hi and 0.15 < lo and hi < 0.45
    lo_big, hi_big = bootstrap_ci(np.tile(x, 10), np.mean, n_boot=500, seed=1)
    assert hi_big - lo_big < hi - lo  # 10x the items: a narrower interval


@pytest.mark.parametrize("reply,letter", [
    ("A", "A"), ("b", "B"), ("The answer matches.\nA", "A"), ("**C**", "C"), ("Grade: D", "D"), ("(B).", "B"),
    ("explanation\nINCORRECT", "B"), ("NOT_ATTEMPTED", "D"), ("partial", None), ("PARTIAL", "C"),
    ("", None), (None, None), ("A or B", None), ("The grade is A because it matches", None), ("AB", None),
    ("A\nThat is my grade.", None),
])
def test_parse_grade_names_one_grade_or_none(reply, letter):
    assert parse_grade(reply)[0] == letter


def test_vote_majority_and_ties():
    assert vote(["A", "A", "B"]) == ("A", False)
    assert vote(["A", "B"]) == (None, True)
    assert vote(["A", None, None]) == ("A", False)
    assert vote([None, None]) == (None, False)
