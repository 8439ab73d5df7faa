"""Lesson 01's overlap measurement: one timeline per DDP step, so its parts add up.

A DDP step's backward pass launches a bucket's all-reduce as soon as the bucket's gradients are
ready, and ``loss.backward()`` returns once every bucket is reduced. Recording, inside one step,
when each bucket was launched and when its all-reduce completed gives a self-consistent split:

* **in flight**: the union of the buckets' ``[launch, done]`` intervals;
* **exposed**: from the last launch (every gradient is ready: the backward's compute is over)
  to the last completion, the communication nothing hides; it lies inside "in flight";
* **hidden**: in flight while the backward pass was still computing (in flight - exposed).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from course_lib.distributed import data_parallel as dp
from course_lib.distributed.launch import rank_device
from course_lib.lessons.data_parallel import _build
from course_lib.model import GPTConfig


def _recording_allreduce(records, bucket):  # noqa: ANN001 - DDP rejects string annotations here
    """DDP comm hook: DDP's default mean all-reduce, recording (launch, done, bytes) per bucket."""
    launch = time.perf_counter()
    buffer = bucket.buffer()
    world = dist.get_world_size()

    def done(fut):  # noqa: ANN001
        records.append((launch, time.perf_counter(), buffer.numel() * buffer.element_size()))
        return fut.value()[0].div_(world)

    return dist.all_reduce(buffer, async_op=True).get_future().then(done)


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def split_step(step: Mapping[str, Any]) -> dict[str, float]:
    """``in_flight``, ``exposed``, ``hidden`` and ``step`` seconds of one recorded step."""
    buckets = step["buckets"]
    ready = max(launch for launch, _, _ in buckets)  # the last gradient is ready
    in_flight = union_length([(launch, end) for launch, end, _ in buckets])
    exposed = max(end for _, end, _ in buckets) - ready
    return {"step": step["step_s"], "in_flight": in_flight, "exposed": exposed, "hidden": in_flight - exposed}


def overlap_timeline_worker(
    rank: int, world_size: int, config: GPTConfig, state: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
    steps: int = 10, bucket_cap_mb: float = 0.03,
) -> list[dict[str, Any]]:
    """A :func:`~course_lib.distributed.launch.spawn` worker: ``steps`` recorded DDP steps on this rank.

    Small buckets (``bucket_cap_mb``) so that a small model has several and the overlap can
    show. Two untimed warm-up steps first (DDP rebuilds its buckets after the first). Returns
    per step ``{"step_s": forward + backward seconds, "buckets": [(launch, done, bytes), ...]}``
    with times in seconds since the step started.
    """
    device = rank_device()
    model = dp.wrap_ddp(_build(config, state), device, bucket_cap_mb=bucket_cap_mb)
    records: list[tuple[float, float, int]] = []
    model.register_comm_hook(records, _recording_allreduce)
    local = {k: v.to(device) for k, v in dp.shard_batch(batch, rank, world_size).items()}

    def one_step() -> dict[str, Any]:
        model.zero_grad(set_to_none=True)
        dist.barrier()  # start together, or a rank's all-reduce times a late peer's compute
        records.clear()
        start = time.perf_counter()
        model(local["input_ids"], labels=local["labels"]).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s = time.perf_counter() - start
        return {"step_s": step_s, "buckets": [(a - start, b - start, n) for a, b, n in records]}

    one_step()
    one_step()
    return [one_step() for _ in range(steps)]
