"""Learning-rate schedules: warmup + cosine to a floor, and warmup-stable-decay (WSD).

``lr_at`` and ``wsd_lr_at`` are the pure formulas (plots, widgets and tests use them);
``warmup_cosine`` and ``warmup_stable_decay`` wrap them in a ``LambdaLR`` so the position is
saved and restored through ``state_dict``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based).

    * warmup: ``base_lr * step / warmup_steps`` for ``step < warmup_steps`` (none when 0);
    * then cosine from ``base_lr`` down to ``base_lr * min_lr_ratio`` at ``total_steps``;
    * after ``total_steps`` it stays at the floor (it never climbs back up).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps == 0 else min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def _factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    return lr_at(step, base_lr=1.0, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`lr_at` for every parameter group's base learning rate.

    Its ``state_dict()``/``load_state_dict()`` carry the step, so a resumed run continues on the
    same curve. (The factor is a ``functools.partial`` of a module-level function: picklable.)
    """
    _factor(0, warmup_steps, total_steps, min_lr_ratio)  # validate now, not at the first step
    return LambdaLR(optimizer, partial(_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                                       min_lr_ratio=min_lr_ratio))


def wsd_lr_at(step: int, *, base_lr: float, warmup_steps: int, decay_start: int, decay_steps: int,
              min_lr_ratio: float = 0.0) -> float:
    """Warmup-stable-decay learning rate at ``step`` (0-based).

    * warmup: ``base_lr * step / warmup_steps`` for ``step < warmup_steps``;
    * stable: ``base_lr`` until ``decay_start``;
    * decay: linear from ``base_lr`` to ``base_lr * min_lr_ratio`` over ``decay_steps`` steps,
      then the floor.

    The point of WSD: the stable phase does not depend on the run's length, so one long run can
    be branched into a short decay from any of its checkpoints (``decay_start`` = that step) to
    read off a fully annealed loss at that budget, where cosine needs a new run per budget.
    """
    if warmup_steps < 0 or decay_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and decay_steps >= 1, got {warmup_steps} and {decay_steps}")
    if decay_start < warmup_steps:
        raise ValueError(f"decay_start={decay_start} must come after the warmup ({warmup_steps} steps)")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min(1.0, max(0, step - decay_start) / decay_steps)
    return base_lr * (1.0 - (1.0 - min_lr_ratio) * progress)


def _wsd_factor(step: int, warmup_steps: int, decay_start: int, decay_steps: int, min_lr_ratio: float) -> float:
    return wsd_lr_at(step, base_lr=1.0, warmup_steps=warmup_steps, decay_start=decay_start,
                     decay_steps=decay_steps, min_lr_ratio=min_lr_ratio)


def warmup_stable_decay(
    optimizer: torch.optim.Optimizer, warmup_steps: int, decay_start: int, decay_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A resumable ``LambdaLR`` following :func:`wsd_lr_at` for every parameter group."""
    _wsd_factor(0, warmup_steps, decay_start, decay_steps, min_lr_ratio)
    return LambdaLR(optimizer, partial(_wsd_factor, warmup_steps=warmup_steps, decay_start=decay_start,
                                       decay_steps=decay_steps, min_lr_ratio=min_lr_ratio))
