"""Mixed precision: the autocast context and the gradient scaler each precision needs.

* ``fp32``: no autocast, no scaler.
* ``bf16``: autocast to bfloat16. Same exponent range as fp32, so gradients do not underflow:
  **no scaler**.
* ``fp16``: autocast to float16 **with** ``torch.amp.GradScaler``: fp16's smallest subnormal is
  about 6e-8, and small gradients round to zero unless the loss is scaled up first.

Uses ``torch.amp`` (``torch.cuda.amp`` is deprecated). Lesson 04's underflow and overflow
demonstrations live in :mod:`course_lib.lessons.mixed_precision`.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check(precision: str) -> None:
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")


def autocast(device: torch.device | str, precision: str) -> ContextManager:
    """The autocast context for ``precision`` on ``device`` (a no-op context for fp32)."""
    _check(precision)
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[precision])


def needs_grad_scaler(precision: str) -> bool:
    """Only fp16 needs loss scaling."""
    _check(precision)
    return precision == "fp16"


def make_grad_scaler(device: torch.device | str, precision: str, **kwargs) -> torch.amp.GradScaler:
    """A ``GradScaler`` that is enabled only for fp16 (a disabled one is a transparent no-op).

    Returning a disabled scaler rather than ``None`` keeps the training loop to one code path:
    ``scaler.scale(loss).backward(); scaler.unscale_(opt); clip; scaler.step(opt); scaler.update()``.
    """
    return torch.amp.GradScaler(torch.device(device).type, enabled=needs_grad_scaler(precision), **kwargs)
