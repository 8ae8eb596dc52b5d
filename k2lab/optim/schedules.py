"""Learning-rate schedules as pure functions of the step and the run's settings.

A resumed run recomputes the same factor for the same step, so stopping and resuming never bends the schedule.
"""

from __future__ import annotations

import math

DEFAULT_WARMUP_STEPS = 20
DEFAULT_WARMUP_FRAC = 0.1  # an unset warm-up is min(20 steps, 10% of the run), so short runs work with defaults


def warmup(max_steps: int, warmup_steps: int | None) -> int:
    """The warm-up length: `warmup_steps` when given, else min(DEFAULT_WARMUP_STEPS, 10% of max_steps)."""
    if warmup_steps is None:
        return min(DEFAULT_WARMUP_STEPS, int(DEFAULT_WARMUP_FRAC * max_steps))
    return warmup_steps


def check_schedule(*, schedule: str, max_steps: int, warmup_steps: int | None, decay_frac: float) -> None:
    """Raise ValueError naming the option to change when the schedule cannot run."""
    if schedule not in ("wsd", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; choose wsd or cosine")
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    if warmup_steps is not None and not 0 <= warmup_steps < max_steps:
        raise ValueError(f"warmup_steps {warmup_steps} must be in [0, max_steps={max_steps}); pass a smaller "
                         f"--warmup-steps or leave it unset (default min({DEFAULT_WARMUP_STEPS}, max_steps/10))")
    if not 0 < decay_frac <= 1:
        raise ValueError(f"decay_frac {decay_frac} must be in (0, 1]; pass --decay-frac 0.2 for example")


def lr_factor(step: int, *, schedule: str, max_steps: int, warmup_steps: int | None, decay_frac: float = 0.2,
              min_ratio: float = 0.1) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    wsd: linear warm-up, constant, then a cosine decay to `min_ratio` over the last `decay_frac` of the steps
    (K2: 2e-4 constant, then cosine to 2e-5, i.e. min_ratio 0.1). cosine: warm-up, then cosine to `min_ratio`.
    """
    check_schedule(schedule=schedule, max_steps=max_steps, warmup_steps=warmup_steps, decay_frac=decay_frac)
    warm = warmup(max_steps, warmup_steps)
    if step < warm:
        return (step + 1) / warm
    decay_start = warm if schedule == "cosine" else max(warm, max_steps - round(decay_frac * max_steps))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - 1 - decay_start))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
