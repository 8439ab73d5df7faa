"""Data parallelism with ``DistributedDataParallel`` (DDP).

Every rank holds a full copy of the model and a different slice of the batch. After the
backward pass DDP all-reduces (averages) the gradients, so every rank takes the same optimizer
step, the one a single process would take on the whole batch. This module holds:

* set-up: :func:`wrap_ddp`, and :func:`make_loader` / :func:`rank_indices` for the
  ``DistributedSampler`` that gives each rank its share of the data (call ``set_epoch``!);
* the numbers a learner checks: :func:`global_mean` (the loss to log is the mean over every
  rank, not rank 0's own), :class:`CommTimer` and :func:`time_ddp_step` (how much of a step is
  spent all-reducing gradients).

The workers that run these checks in spawned processes live in :mod:`course_lib.lessons.data_parallel`.

The accumulation window itself (token-weighted loss, ``no_sync`` on all but the last
micro-step, loss times world size to undo DDP's averaging) is one implementation, shared with
the training loop: :func:`course_lib.training.accumulate_gradients`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from course_lib.distributed.launch import rank_device

Batch = Mapping[str, torch.Tensor]


def wrap_ddp(model: nn.Module, device: torch.device | None = None, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Move ``model`` to this rank's device and wrap it in ``DistributedDataParallel``.

    DDP broadcasts rank 0's parameters at construction, so every rank starts identical, and
    registers hooks that all-reduce gradients in buckets while the backward pass runs.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "wrap_ddp() needs a process group: run inside course_lib.distributed.spawn(...) or under "
            "torchrun after course_lib.distributed.init_from_env()"
        )
    device = rank_device() if device is None else device
    model.to(device)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)


def _check_enough_samples(n: int, world_size: int) -> None:
    """Refuse a world larger than the data: ranks would read nothing or the same repeated sample."""
    if n < world_size:
        raise ValueError(
            f"the dataset has {n} samples, fewer than world_size={world_size}: every rank needs at "
            "least one; use fewer processes or more data"
        )


def rank_indices(
    n: int, world_size: int, epoch: int = 0, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> list[list[int]]:
    """The sample indices each rank reads in ``epoch``, exactly as ``DistributedSampler`` gives them.

    Shuffling is seeded by ``seed + epoch``: a loop that forgets ``sampler.set_epoch(epoch)``
    reads the same order every epoch. When ``n`` is not divisible by ``world_size`` the sampler
    repeats a few samples (or drops them with ``drop_last``) so every rank gets as many.
    """
    if n < 1 or world_size < 1:
        raise ValueError(f"need n >= 1 and world_size >= 1, got n={n}, world_size={world_size}")
    _check_enough_samples(n, world_size)
    out = []
    for rank in range(world_size):
        sampler = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> tuple[DataLoader, DistributedSampler]:
    """A ``DataLoader`` that reads only this rank's share of ``dataset``.

    Returns the loader and its sampler: call ``sampler.set_epoch(epoch)`` at the start of every
    epoch, or each epoch repeats the first one's order.
    """
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    _check_enough_samples(len(dataset), sampler.num_replicas)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)
    return loader, sampler


def shard_batch(batch: Batch, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s contiguous slice of the rows of ``batch`` (the global batch)."""
    rows = next(iter(batch.values())).shape[0]
    if rows % world_size:
        raise ValueError(f"a batch of {rows} rows does not split evenly over {world_size} ranks; "
                         f"use a multiple of {world_size}")
    per = rows // world_size
    return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def split_micro(batch: Batch, n_micro: int) -> list[dict[str, torch.Tensor]]:
    """Cut ``batch`` into ``n_micro`` equal micro-batches (rows) for gradient accumulation."""
    rows = next(iter(batch.values())).shape[0]
    if rows % n_micro:
        raise ValueError(f"{rows} rows do not split into {n_micro} equal micro-batches")
    per = rows // n_micro
    return [{k: v[i * per:(i + 1) * per] for k, v in batch.items()} for i in range(n_micro)]


def global_mean(value_sum: float | torch.Tensor, count: int | float) -> float:
    """``sum over ranks of value_sum / sum over ranks of count``: the number to log.

    Printing rank 0's own loss shows one shard's loss, not the batch's: it differs from rank to
    rank and from the single-process run. Outside a process group this is ``value_sum / count``.
    """
    totals = torch.tensor([float(value_sum), float(count)], dtype=torch.float64)
    if dist.is_initialized():
        device = rank_device()
        totals = totals.to(device)
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


@dataclass
class CommTimer:
    """A DDP communication hook that all-reduces gradient buckets and records each one.

    ``timer.register(ddp_model)`` (before the first backward) replaces DDP's default all-reduce
    with the same operation plus a record ``(start, end, bytes)`` per bucket: the time during
    which a gradient all-reduce was in flight, in seconds.

    How it is timed depends on where the gradients are (:func:`times_with_cuda_events`):

    * CPU (gloo): host clock from the hook's call until the collective's future completes.
    * CUDA (NCCL): the future completes when the collective is *enqueued*, so the host clock
      would read about zero. Instead a CUDA event is recorded on the compute stream before the
      collective (which NCCL's stream waits for) and one in the future's callback, on the
      stream that waits for the collective's kernel: their GPU time difference is the transfer.
      Events are read (one synchronisation) when :attr:`records` is first asked for.
    """

    _records: list[tuple[float, float, int]] = field(default_factory=list)
    _events: list[tuple[Any, Any, int]] = field(default_factory=list)  # (start, end, bytes) CUDA events

    def register(self, model: DistributedDataParallel) -> None:
        model.register_comm_hook(self, _timed_allreduce_hook)

    def reset(self) -> None:
        self._records.clear()
        self._events.clear()

    @property
    def records(self) -> list[tuple[float, float, int]]:
        """``(start, end, bytes)`` per all-reduced bucket (CUDA: seconds since the first bucket's start)."""
        if self._events:
            origin = self._events[0][0]
            for start, end, nbytes in self._events:
                end.synchronize()
                self._records.append((origin.elapsed_time(start) / 1e3, origin.elapsed_time(end) / 1e3, nbytes))
            self._events.clear()
        return self._records

    @property
    def calls(self) -> int:
        return len(self.records)

    @property
    def seconds(self) -> float:
        return sum(end - start for start, end, _ in self.records)

    @property
    def bytes(self) -> int:
        return sum(n for _, _, n in self.records)


def times_with_cuda_events(device: torch.device) -> bool:
    """True where a collective's future completes at enqueue (CUDA/NCCL): time it with CUDA events."""
    return device.type == "cuda"


def _timed_allreduce_hook(timer, bucket):  # noqa: ANN001 - DDP rejects string annotations here
    """DDP comm hook: ``timer`` is a :class:`CommTimer`, ``bucket`` a ``dist.GradBucket``."""
    buffer = bucket.buffer()
    world = dist.get_world_size()
    nbytes = buffer.numel() * buffer.element_size()
    if times_with_cuda_events(buffer.device):
        start_event = torch.cuda.Event(enable_timing=True)
        start_event.record()  # the collective's stream waits for this point of the compute stream
        future = dist.all_reduce(buffer, async_op=True).get_future()

        def finish_cuda(fut: torch.futures.Future[Any]) -> torch.Tensor:
            end_event = torch.cuda.Event(enable_timing=True)
            end_event.record()  # this callback's stream waits for the collective's kernel
            timer._events.append((start_event, end_event, nbytes))
            return fut.value()[0].div_(world)

        return future.then(finish_cuda)
    start = time.perf_counter()
    future = dist.all_reduce(buffer, async_op=True).get_future()

    def finish(fut: torch.futures.Future[Any]) -> torch.Tensor:
        timer._records.append((start, time.perf_counter(), nbytes))
        return fut.value()[0].div_(world)  # DDP's default: the mean over ranks

    return future.then(finish)


@dataclass
class StepTiming:
    """Where the time of one DDP training step (forward + backward + all-reduce) goes.

    Attributes:
        step_s: median time of a normal DDP step.
        compute_s: median time of the same step under ``no_sync`` (no communication at all).
        allreduce_s: median time per step with a gradient all-reduce in flight (:class:`CommTimer`).
        allreduce_bytes: gradient bytes all-reduced per step (4 bytes per fp32 parameter).
        world_size: number of ranks.
    """

    step_s: float
    compute_s: float
    allreduce_s: float
    allreduce_bytes: int
    world_size: int

    @property
    def comm_share(self) -> float:
        """Fraction of the step during which gradients were being all-reduced."""
        return self.allreduce_s / self.step_s

    @property
    def exposed_comm_s(self) -> float:
        """Time the all-reduce adds to the step (not hidden behind the backward pass)."""
        return max(self.step_s - self.compute_s, 0.0)


def _median(xs: Sequence[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def time_ddp_step(model: DistributedDataParallel, timer: CommTimer, batch: Batch, steps: int = 5) -> StepTiming:
    """Time forward + backward of ``batch`` with and without the gradient all-reduce.

    ``timer`` must have been registered on ``model``. One untimed warm-up step comes first.
    Each rank reports the medians over ``steps`` of its own clock.
    """
    device = rank_device()

    def one_step(sync: bool) -> float:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()  # start together, or the all-reduce times a rank waiting for a late peer
        start = time.perf_counter()
        with contextlib.nullcontext() if sync else model.no_sync():
            model(batch["input_ids"], labels=batch["labels"]).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    one_step(True)
    compute = [one_step(False) for _ in range(steps)]
    step, comm, nbytes = [], [], 0
    for _ in range(steps):
        timer.reset()
        step.append(one_step(True))
        comm.append(timer.seconds)
        nbytes = timer.bytes
    return StepTiming(_median(step), _median(compute), _median(comm), nbytes, dist.get_world_size())
