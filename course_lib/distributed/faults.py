"""Fault injection for testing recovery under ``torchrun --max-restarts``.

Real jobs lose workers (a node reboots, the OOM killer strikes). To *test* that a run survives
that, the training loop calls :func:`maybe_inject_fault` at the start of every step; it does
nothing unless two environment variables ask for a failure:

* ``COURSE_FAULT_INJECT_STEP=N``: kill this process with ``SIGKILL`` (no clean-up, no
  ``finally``, exactly like the OOM killer) when step ``N`` starts;
* ``COURSE_FAULT_INJECT_RANK=R``: only on global rank ``R`` (default 1, a worker that does not
  write checkpoints; use 0 to kill the checkpoint writer instead).

The kill happens in torchrun's first attempt only (``TORCHELASTIC_RESTART_COUNT`` is 0 or
unset), so the restarted workers run through: the failure happens *once*, as in the tests.
"""

from __future__ import annotations

import os
import signal

FAULT_STEP_ENV = "COURSE_FAULT_INJECT_STEP"
FAULT_RANK_ENV = "COURSE_FAULT_INJECT_RANK"


def maybe_inject_fault(step: int, rank: int) -> None:
    """``SIGKILL`` this process if the environment asks for a failure at ``step`` on ``rank``."""
    wanted = os.environ.get(FAULT_STEP_ENV)
    if wanted is None or int(wanted) != step:
        return
    if rank != int(os.environ.get(FAULT_RANK_ENV, "1")):
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return  # already failed once; the restarted worker must get through
    os.kill(os.getpid(), signal.SIGKILL)
