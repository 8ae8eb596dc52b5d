"""Statistics for the evals: bootstrap confidence intervals, unbiased pass@k, rater agreement.

Cohen's kappa and Krippendorff's alpha (nominal) are written out here because they are a few lines each and
the libraries that have them (scikit-learn, krippendorff) would be the only reason to depend on them.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Hashable, Sequence

import numpy as np


def bootstrap_ci(values: Sequence, statistic: Callable[[np.ndarray], float], n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` over items resampled with replacement (seeded)."""
    x = np.asarray(values)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    stats = np.array([statistic(x[i]) for i in idx], dtype=float)
    stats = stats[~np.isnan(stats)]
    if len(stats) == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return (float(lo), float(hi))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def confusion_matrix(a: Sequence[Hashable], b: Sequence[Hashable], labels: Sequence[Hashable]) -> list[list[int]]:
    """m[i][j] = items rated labels[i] by rater a and labels[j] by rater b."""
    pos = {lab: i for i, lab in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for x, y in zip(a, b, strict=True):
        m[pos[x]][pos[y]] += 1
    return m


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa for two raters over the same items: (p_o - p_e) / (1 - p_e)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"cohen_kappa: need two equal, non-empty rating lists, got {len(a)} and {len(b)}")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / n**2
    if p_e == 1.0:  # both raters used one and the same label: agreement is total but kappa is undefined
        return 1.0 if p_o == 1.0 else float("nan")
    return (p_o - p_e) / (1 - p_e)


def krippendorff_alpha(ratings: Sequence[Sequence[Hashable | None]]) -> float:
    """Krippendorff's alpha, nominal metric; `ratings[rater][item]`, None where a rater gave no label.

    alpha = 1 - D_o / D_e from the coincidence matrix of pairable values (units with >= 2 labels).
    """
    n_items = {len(r) for r in ratings}
    if len(n_items) != 1:
        raise ValueError(f"krippendorff_alpha: raters rated different numbers of items: {sorted(n_items)}")
    coinc: Counter = Counter()  # o_ck
    for unit in zip(*ratings):
        vals = [v for v in unit if v is not None]
        m = len(vals)
        if m < 2:
            continue
        counts = Counter(vals)
        for c in counts:
            for k in counts:
                pairs = counts[c] * (counts[k] - (c == k))
                coinc[(c, k)] += pairs / (m - 1)
    n_c: Counter = Counter()
    for (c, _k), v in coinc.items():
        n_c[c] += v
    n = sum(n_c.values())
    if n == 0:
        return float("nan")
    d_o = sum(v for (c, k), v in coinc.items() if c != k) / n
    d_e = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n * (n - 1))
    if d_e == 0:
        return 1.0 if d_o == 0 else float("nan")
    return 1.0 - d_o / d_e
