"""Lesson 02's pipeline workers: one pipeline step per rank, by hand or through ``torch.distributed.pipelining``.

Rank ``r`` is stage ``r`` of :mod:`course_lib.distributed.pipeline`; every worker returns what
the lesson and the tests compare with the unsplit model (loss, gradients by the unsplit model's
names, measured intervals).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from course_lib.constants import IGNORE_INDEX
from course_lib.distributed.launch import rank_device
from course_lib.distributed.pipeline import (
    GPTStage,
    Interval,
    build_stage,
    partition_layers,
    run_schedule,
    sync_tied_grads,
    torch_pipeline_step,
)
from course_lib.model import GPT, GPTConfig


def _step_result(stage: GPTStage, loss: float | None) -> dict[str, Any]:
    return {
        "loss": loss,
        "grads": {n: p.grad.detach().cpu().clone() for n, p in stage.model_named_parameters().items()},
    }


def _setup(rank: int, world_size: int, config: GPTConfig, state: dict[str, torch.Tensor]) -> tuple[GPTStage, Any]:
    model = GPT(config)
    model.load_state_dict(state)
    # every rank must take part in creating a group, even those outside it
    tied_group = dist.new_group([0, world_size - 1]) if world_size > 1 else None
    return build_stage(model, rank, world_size).to(rank_device()), tied_group


def pipeline_worker(
    rank: int, world_size: int, config: GPTConfig, state: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
    microbatches: int, kind: str = "1f1b",
) -> dict[str, Any]:
    """A :func:`~course_lib.distributed.launch.spawn` worker: one hand-written pipeline step.

    Rank ``r`` is stage ``r``. Returns the stage's ``layers``, ``loss`` (last stage), gradients
    under the unsplit model's names, the measured ``intervals`` and the ``peak`` number of
    micro-batches whose activations were held at once.
    """
    stage, tied_group = _setup(rank, world_size, config, state)
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.shape[0] % microbatches:
        raise ValueError(f"a batch of {ids.shape[0]} rows does not split into {microbatches} equal micro-batches")
    n_real = int((labels != IGNORE_INDEX).sum())
    micro_shape = (ids.shape[0] // microbatches, ids.shape[1])
    loss, intervals, peak = run_schedule(stage, kind, world_size, rank, microbatches, ids, labels, n_real, micro_shape)
    sync_tied_grads(stage, world_size, tied_group)
    result = _step_result(stage, loss)
    result.update(layers=list(partition_layers(config.n_layer, world_size)[rank]), intervals=intervals, peak=peak)
    return result


def bubble_sweep_worker(
    rank: int, world_size: int, config: GPTConfig, state: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
    runs: Sequence[tuple[str, int]], repeats: int = 3,
) -> dict[tuple[str, int], list[Interval]]:
    """Time several ``(kind, microbatches)`` pipeline steps in one process group.

    One untimed warm-up step first (the first step pays one-off costs), then each run
    ``repeats`` times; for each run this rank returns the intervals of the repeat with the
    shortest step (the least disturbed by other programs on the machine: the same repeat
    index on every rank).
    """
    stage, _ = _setup(rank, world_size, config, state)
    ids, labels = batch["input_ids"], batch["labels"]
    n_real = int((labels != IGNORE_INDEX).sum())

    def step(kind: str, m: int) -> list[Interval]:
        stage.zero_grad(set_to_none=True)
        return run_schedule(stage, kind, world_size, rank, m, ids, labels, n_real,
                            (ids.shape[0] // m, ids.shape[1]))[1]

    step(*runs[0])
    out = {}
    for kind, m in runs:
        tries = [step(kind, m) for _ in range(repeats)]
        ends = torch.tensor([max(i.end for i in t) for t in tries], device=rank_device())  # NCCL: on the GPU
        dist.all_reduce(ends, op=dist.ReduceOp.MAX)  # the step ends when its slowest stage does
        out[(kind, m)] = tries[int(ends.argmin())]
    return out


def torch_pipeline_worker(
    rank: int, world_size: int, config: GPTConfig, state: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
    microbatches: int, kind: str = "1f1b",
) -> dict[str, Any]:
    """A :func:`~course_lib.distributed.launch.spawn` worker: one step via ``torch.distributed.pipelining``."""
    stage, tied_group = _setup(rank, world_size, config, state)
    loss = torch_pipeline_step(stage, rank, world_size, microbatches, kind, batch["input_ids"], batch["labels"])
    sync_tied_grads(stage, world_size, tied_group)
    return _step_result(stage, loss)

