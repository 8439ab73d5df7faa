"""Lesson 01's and 05's data-parallel workers: functions :func:`course_lib.distributed.launch.spawn` runs on each rank.

Each builds the model from ``config`` and ``state``, runs one check of
:mod:`course_lib.distributed.data_parallel` (gradients equal the full batch's, the sampler's
epochs, a DDP training run, communication timing) and returns what the lesson or test compares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from course_lib.constants import IGNORE_INDEX
from course_lib.distributed.data_parallel import (
    Batch,
    CommTimer,
    StepTiming,
    global_mean,
    make_loader,
    shard_batch,
    split_micro,
    time_ddp_step,
    wrap_ddp,
)
from course_lib.distributed.launch import rank_device
from course_lib.model import GPT, GPTConfig
from course_lib.training import TrainConfig, accumulate_gradients, train


def _build(config: GPTConfig, state: Mapping[str, torch.Tensor]) -> GPT:
    model = GPT(config)
    model.load_state_dict(state)
    return model


def ddp_gradients_worker(
    rank: int, world_size: int, config: GPTConfig, state: Mapping[str, torch.Tensor], batch: Batch,
    grad_accum: int = 1,
) -> dict[str, Any]:
    """One DDP accumulation window on this rank's shard of ``batch``; report what a learner checks.

    Rank ``r`` takes rows ``shard_batch(batch, r, world_size)``, cuts them into ``grad_accum``
    micro-batches and runs :func:`course_lib.training.accumulate_gradients` (``no_sync`` on all
    but the last). Returns the gradients, the logged (global) loss, this rank's local loss and
    the number of all-reduce calls the window made.
    """
    device = rank_device()
    model = wrap_ddp(_build(config, state), device)
    timer = CommTimer()
    timer.register(model)
    local = shard_batch(batch, rank, world_size)
    loss = accumulate_gradients(model, split_micro(local, grad_accum), device=device)
    with torch.no_grad():
        n_real = int((local["labels"] != IGNORE_INDEX).sum())
        local_sum = model.module(local["input_ids"].to(device), labels=local["labels"].to(device),
                                 reduction="sum").loss
    return {
        "grads": {name: p.grad.detach().cpu() for name, p in model.module.named_parameters()},
        "global_loss": loss,
        "local_loss": local_sum.item() / n_real,
        "global_mean_of_local": global_mean(local_sum.item(), n_real),
        "allreduce_calls": timer.calls,
    }


def sampler_worker(rank: int, world_size: int, n: int, epochs: int, call_set_epoch: bool = True,
                   seed: int = 0) -> list[list[int]]:
    """The sample indices this rank's :func:`~course_lib.distributed.data_parallel.make_loader` yields in each epoch (batch size 1).

    With ``call_set_epoch=False`` the loop forgets ``sampler.set_epoch(epoch)``, as the
    tutorial's loop would if it were missing: every epoch then repeats epoch 0's order.
    """
    loader, sampler = make_loader(list(range(n)), batch_size=1, seed=seed)
    seen = []
    for epoch in range(epochs):
        if call_set_epoch:
            sampler.set_epoch(epoch)
        seen.append([int(x) for batch in loader for x in batch])
    return seen


def ddp_train_worker(
    rank: int, world_size: int, config: GPTConfig, state: Mapping[str, torch.Tensor],
    global_batches: Sequence[Batch], train_config: TrainConfig,
) -> dict[str, Any]:
    """Run :func:`course_lib.training.train` under DDP on this rank's shard of each global batch.

    Returns the logged history (global-mean losses, the same on every rank) and the final
    parameters, to compare with one process training on the full batches.
    """
    device = rank_device()
    model = wrap_ddp(_build(config, state), device)
    shards = [shard_batch(b, rank, world_size) for b in global_batches]
    result = train(model, shards, train_config, device=device)
    return {
        "losses": result.values("loss"),
        "params": {name: p.detach().cpu() for name, p in model.module.named_parameters()},
    }


def comm_timing_worker(
    rank: int, world_size: int, config: GPTConfig, state: Mapping[str, torch.Tensor], batch: Batch, steps: int = 5
) -> StepTiming:
    """Measure one DDP step's compute and all-reduce time on this rank (see :func:`~course_lib.distributed.data_parallel.time_ddp_step`)."""
    device = rank_device()
    model = wrap_ddp(_build(config, state), device)
    timer = CommTimer()
    timer.register(model)
    local = {k: v.to(device) for k, v in shard_batch(batch, rank, world_size).items()}
    return time_ddp_step(model, timer, local, steps)

