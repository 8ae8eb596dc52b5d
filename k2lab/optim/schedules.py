"""Learning-rate schedules as pure functions of the step and the run's settings.

A resumed run recomputes the same factor for the same step, so stopping and resuming never bends the schedule.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, schedule: str, max_steps: int, warmup_steps: int, decay_frac: float = 0.2,
              min_ratio: float = 0.1) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    wsd: linear warm-up, constant, then a cosine decay to `min_ratio` over the last `decay_frac` of the steps
    (K2: 2e-4 constant, then cosine to 2e-5, i.e. min_ratio 0.1). cosine: warm-up, then cosine to `min_ratio`.
    """
    if schedule not in ("wsd", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; choose wsd or cosine")
    if not 0 <= warmup_steps < max_steps or not 0 < decay_frac <= 1:
        raise ValueError(f"bad schedule settings: warmup_steps={warmup_steps}, max_steps={max_steps}, "
                         f"decay_frac={decay_frac}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = warmup_steps if schedule == "cosine" else max(warmup_steps, max_steps - round(decay_frac * max_steps))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - 1 - decay_start))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
