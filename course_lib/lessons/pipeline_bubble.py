"""Lesson 02's bubble measurement: each pipeline op's busy time, robust to a busy machine.

A wall-clock timeline of two stage processes on a shared 2-core machine counts as "busy" the
time the operating system hands a stage's core to another program, and as "idle" the time a
stage waits for a neighbour that was descheduled. The bubble read from it then depends on the
neighbours. :func:`busy_time_sweep_worker` times every forward and backward twice over: on the
wall clock (for the picture) and on the thread's CPU clock (``time.thread_time``: only the time
this thread really computed). Replaying the schedule's dependencies with the median CPU time of
each op (:func:`course_lib.distributed.pipeline.replay_schedule`) gives the bubble of the same
pipeline on devices of its own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from course_lib.constants import IGNORE_INDEX
from course_lib.distributed import pipeline as pp
from course_lib.lessons.pipeline import _setup
from course_lib.model import GPTConfig


def busy_time_sweep_worker(
    rank: int, world_size: int, config: GPTConfig, state: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
    runs: Sequence[tuple[str, int]], repeats: int = 5,
) -> dict[str, Any]:
    """A :func:`~course_lib.distributed.launch.spawn` worker: every ``(kind, microbatches)`` step, timed.

    One untimed warm-up step per run, then ``repeats`` rounds that each run every run once on
    the CPU clock, in turn (a busy spell of the machine hits all runs alike), then each run once
    on the wall clock, for the picture. Returns ``{"wall": {run: intervals}, "cpu": {run:
    [intervals of each round]}}`` for this rank's stage (CPU intervals: only the durations are
    meaningful, not the starts).
    """
    stage, _ = _setup(rank, world_size, config, state)
    ids, labels = batch["input_ids"], batch["labels"]
    n_real = int((labels != IGNORE_INDEX).sum())

    def step(kind: str, m: int, clock: Any) -> list[pp.Interval]:
        stage.zero_grad(set_to_none=True)
        return pp.run_schedule(stage, kind, world_size, rank, m, ids, labels, n_real,
                               (ids.shape[0] // m, ids.shape[1]), clock=clock)[1]

    for kind, m in runs:
        step(kind, m, time.perf_counter)
    cpu: dict[tuple[str, int], list[list[pp.Interval]]] = {run: [] for run in runs}
    for _ in range(repeats):
        for run in runs:
            cpu[run].append(step(*run, time.thread_time))
    return {"wall": {run: step(*run, time.perf_counter) for run in runs}, "cpu": cpu}
