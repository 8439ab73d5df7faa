"""Model and pipeline parallelism: split the layers over stages, then keep every stage busy.

*Model parallelism* puts consecutive layers on different devices ("stages"). Run naively, one
batch flows through the stages one after another, so at any moment one stage works and the
others wait. *Pipeline parallelism* cuts the batch into ``M`` micro-batches so that stage ``s``
can work on micro-batch ``m`` while stage ``s+1`` works on ``m-1``. What remains idle is the
*bubble*: filling and draining the pipe costs ``P-1`` of ``M+P-1`` time slots,

    bubble fraction = (P - 1) / (M + P - 1)      (P stages, M micro-batches)

for both GPipe (all forwards, then all backwards) and 1F1B (one forward, one backward in
steady state), which differ in memory: GPipe keeps the activations of all ``M`` micro-batches,
1F1B at most ``P - s`` on stage ``s``.

This module has three layers:

* pure maths for plots, widgets and tests: :func:`partition_layers`, :func:`schedule`,
  :func:`bubble_fraction`, :func:`schedule_bubble`, :func:`measured_bubble`, :func:`peak_in_flight`;
* a hand-written pipeline over point-to-point ops (``batch_isend_irecv``): :class:`GPTStage` (stage 0
  embeds, the last stage applies the head and the loss) and :func:`run_schedule`, which records
  when each stage computes so the bubble is *measured*;
* :func:`torch_pipeline_step`, the same model through ``torch.distributed.pipelining``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from course_lib.constants import IGNORE_INDEX
from course_lib.device import synchronize
from course_lib.model import GPT, lm_loss

KINDS = ("naive", "gpipe", "1f1b")


class Op(NamedTuple):
    """One unit of work in a schedule: ``op`` ("F" or "B") of ``microbatch`` on ``stage`` at time ``t``."""

    stage: int
    t: int
    op: str
    microbatch: int


class Interval(NamedTuple):
    """A stage computing ``op`` of ``microbatch`` from ``start`` to ``end`` (seconds or time slots)."""

    stage: int
    start: float
    end: float
    op: str
    microbatch: int


# ------------------------------------------------------------------ placement


def partition_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous, balanced layer ranges, one per stage; every layer placed exactly once.

    When ``n_stages`` does not divide ``n_layers`` the first ``n_layers % n_stages`` stages
    take one layer more: 5 layers on 2 stages gives ``[range(0, 3), range(3, 5)]``. Stage
    indices never exceed ``n_stages - 1``.
    """
    if n_stages < 1 or n_layers < 1:
        raise ValueError(f"need n_layers >= 1 and n_stages >= 1, got {n_layers} and {n_stages}")
    if n_stages > n_layers:
        raise ValueError(f"{n_stages} stages for {n_layers} layers would leave stages without a layer; "
                         f"use at most {n_layers} stages or a deeper model")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


# ------------------------------------------------------------------ schedules (pure)


def stage_program(kind: str, stages: int, microbatches: int, stage: int) -> list[tuple[str, int]]:
    """The order in which ``stage`` runs its forwards ("F") and backwards ("B").

    * ``"naive"``: F0 B0 F1 B1 ...: a micro-batch enters only when the previous one has gone
      all the way back, so one stage works at a time (plain model parallelism).
    * ``"gpipe"``: all forwards, then all backwards.
    * ``"1f1b"``: ``P - 1 - stage`` warm-up forwards, then alternate one forward and one
      backward, then the remaining backwards.
    """
    _check_shape(kind, stages, microbatches)
    if not 0 <= stage < stages:
        raise ValueError(f"stage must be in [0, {stages}), got {stage}")
    M = microbatches
    if kind == "naive":
        return [(op, m) for m in range(M) for op in ("F", "B")]
    if kind == "gpipe":
        return [("F", m) for m in range(M)] + [("B", m) for m in range(M)]
    warmup = min(stages - 1 - stage, M)
    program = [("F", m) for m in range(warmup)]
    for i in range(M - warmup):
        program += [("F", warmup + i), ("B", i)]
    return program + [("B", m) for m in range(M - warmup, M)]


def _check_shape(kind: str, stages: int, microbatches: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {KINDS}")
    if stages < 1 or microbatches < 1:
        raise ValueError(f"need stages >= 1 and microbatches >= 1, got {stages} and {microbatches}")


def schedule(kind: str, stages: int, microbatches: int) -> list[Op]:
    """When each stage runs each forward and backward, with every op taking one time slot.

    Each stage follows :func:`stage_program` and starts an op as soon as it is free and its
    input exists: ``F`` of micro-batch ``m`` on stage ``s`` needs ``F(s-1, m)``; ``B(s, m)``
    needs ``B(s+1, m)`` (on the last stage, its own ``F``). Returns the ops sorted by time.
    """
    timed = replay_schedule(kind, stages, microbatches, lambda s, op, m: 1.0)
    return [Op(i.stage, int(i.start), i.op, i.microbatch) for i in timed]


def replay_schedule(
    kind: str, stages: int, microbatches: int, duration: Callable[[int, str, int], float],
) -> list[Interval]:
    """The timeline of :func:`schedule` when op ``(stage, op, microbatch)`` takes ``duration(...)``.

    The same dependencies as :func:`schedule`, with each stage on its own device and transfers
    free. Fed with each op's measured compute time it gives the bubble a pipeline has when
    nothing else competes for its devices. Returns the intervals sorted by start.
    """
    _check_shape(kind, stages, microbatches)
    programs = [stage_program(kind, stages, microbatches, s) for s in range(stages)]
    finish: dict[tuple[str, int, int], float] = {}  # (op, stage, mb) -> end time
    free = [0.0] * stages
    pos = [0] * stages
    events: list[Interval] = []
    while any(pos[s] < len(programs[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if pos[s] == len(programs[s]):
                continue
            op, m = programs[s][pos[s]]
            if op == "F":
                dep = ("F", s - 1, m) if s > 0 else None
            else:
                dep = ("B", s + 1, m) if s < stages - 1 else ("F", s, m)
            if dep is not None and dep not in finish:
                continue
            start = max(free[s], finish[dep] if dep is not None else 0.0)
            finish[(op, s, m)] = free[s] = start + duration(s, op, m)
            events.append(Interval(s, start, free[s], op, m))
            pos[s] += 1
            progressed = True
        if not progressed:  # cannot happen for the built-in programs; guards future edits
            raise RuntimeError(f"schedule {kind!r} deadlocks at positions {pos}")
    return sorted(events, key=lambda e: (e.start, e.stage))


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Predicted idle fraction of a GPipe or 1F1B pipeline: ``(P - 1) / (M + P - 1)``."""
    if stages < 1 or microbatches < 1:
        raise ValueError(f"need stages >= 1 and microbatches >= 1, got {stages} and {microbatches}")
    return (stages - 1) / (microbatches + stages - 1)


def as_intervals(events: Sequence[Op]) -> list[Interval]:
    """Unit-time schedule ops as :class:`Interval` records (for plots and :func:`measured_bubble`)."""
    return [Interval(e.stage, float(e.t), float(e.t + 1), e.op, e.microbatch) for e in events]


def measured_bubble(intervals: Sequence[Interval], stages: int | None = None) -> float:
    """Idle fraction ``1 - busy / (stages * makespan)`` of recorded compute intervals.

    ``makespan`` runs from the first start to the last end over all stages. ``stages``
    defaults to the number of distinct stages in ``intervals``.
    """
    if not intervals:
        raise ValueError("no intervals to measure")
    stages = len({i.stage for i in intervals}) if stages is None else stages
    makespan = max(i.end for i in intervals) - min(i.start for i in intervals)
    busy = sum(i.end - i.start for i in intervals)
    return 1.0 - busy / (stages * makespan)


def schedule_bubble(kind: str, stages: int, microbatches: int) -> float:
    """Idle fraction of the unit-time :func:`schedule` (equals :func:`bubble_fraction` for gpipe/1f1b)."""
    return measured_bubble(as_intervals(schedule(kind, stages, microbatches)), stages)


def peak_in_flight(kind: str, stages: int, microbatches: int) -> list[int]:
    """Per stage, the most micro-batches whose activations are held at once (forward done, backward not).

    GPipe holds all ``M`` on every stage; 1F1B holds at most ``P - s`` on stage ``s``: the
    same bubble for much less activation memory.
    """
    peaks = []
    for s in range(stages):
        held = peak = 0
        for op, _ in stage_program(kind, stages, microbatches, s):
            held += 1 if op == "F" else -1
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


# ------------------------------------------------------------------ the stage module


class GPTStage(nn.Module):
    """The part of a :class:`~course_lib.model.GPT` that one pipeline stage owns.

    Blocks ``layers`` (kept under their original names, ``blocks.<i>``); stage 0 also owns the
    embeddings and runs ``GPT.embed``; the last stage owns the final norm and the head and runs
    ``GPT.head``. The head is tied to the token embedding, so with several stages the first and
    last stage each hold a copy of that matrix and must add their gradients
    (:func:`sync_tied_grads`).
    """

    def __init__(self, model: GPT, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        if not model.config.tie_embeddings:
            raise ValueError("pipeline stages share the tied embedding/head between the first and last stage; "
                             "build the model with GPTConfig(tie_embeddings=True)")
        self.config = model.config
        self.first, self.last = first, last
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        if first:
            self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop
        if last:
            self.ln_f, self.lm_head = model.ln_f, model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (stage 0) or hidden states in; hidden states or logits (last stage) out."""
        if self.first:
            x = GPT.embed(self, x)  # the model's own code: this stage has the modules it uses
        for block in self.blocks.values():
            x = block(x)
        return GPT.head(self, x) if self.last else x

    def model_named_parameters(self) -> dict[str, nn.Parameter]:
        """This stage's parameters under their names in the unsplit model."""
        return {("wte.weight" if n == "lm_head.weight" else n): p for n, p in self.named_parameters()}


def build_stage(model: GPT, stage: int, n_stages: int) -> GPTStage:
    """The :class:`GPTStage` for ``stage`` of ``n_stages`` (layers from :func:`partition_layers`)."""
    layers = partition_layers(model.config.n_layer, n_stages)[stage]
    return GPTStage(model, layers, first=stage == 0, last=stage == n_stages - 1)


def sync_tied_grads(stage: GPTStage, n_stages: int, group: Any) -> None:
    """Add the tied embedding/head gradients of the first and last stage (both end up with the sum).

    ``group`` is a process group holding ranks ``0`` and ``n_stages - 1`` (made with
    ``dist.new_group``, which every rank must call); ``None`` when there is one stage.
    """
    if n_stages == 1 or not (stage.first or stage.last):
        return
    weight = stage.wte.weight if stage.first else stage.lm_head.weight
    dist.all_reduce(weight.grad, group=group)


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor, n_real: int) -> torch.Tensor:
    # summed token loss over the micro-batch / real tokens in the WHOLE batch: the micro-batch
    # losses then add up to the full batch's mean loss, and so do their gradients
    return lm_loss(logits, labels, reduction="sum") / n_real


# ------------------------------------------------------------------ hand-written pipeline


def run_schedule(
    stage: GPTStage, kind: str, n_stages: int, rank: int, microbatches: int,
    input_ids: torch.Tensor | None, labels: torch.Tensor | None, n_real: int, micro_shape: tuple[int, int],
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float | None, list[Interval], int]:
    """Run one training step of the pipeline on this rank (stage ``rank``) with point-to-point ops.

    Stage 0 gets ``input_ids`` (the whole batch), the last stage ``labels``; both are cut into
    ``microbatches`` equal micro-batches of ``micro_shape`` = (rows, seq_len), which every
    stage must know to receive hidden states of shape (rows, seq_len, n_embd); ``n_real`` is
    the number of real (not -100) labels in the whole batch.

    Activations go forward and their gradients come back. Before each compute op this rank
    posts, in ONE ``dist.batch_isend_irecv`` group, the sends of what it computed last and the
    receive this op needs, then waits for the group: NCCL runs a pair's sends and receives in
    issue order on one stream, so in 1F1B's steady state "send a1, then recv g0" on stage 0
    against "send g0, then recv a1" on stage 1 would wait on each other forever; posted as one
    group, their order is free (``torch.distributed.pipelining`` does the same).

    Returns ``(loss, intervals, peak)``: the full-batch mean loss on the last stage (``None``
    elsewhere), the compute intervals of this stage (seconds since a common barrier; waiting
    for communication is not counted), and the most micro-batches whose activations it held at once.
    ``clock`` reads the time: wall time by default; ``time.thread_time`` (CPU) gives each op's
    busy time without the time the operating system gave this core to other programs (then
    the starts of different stages are not comparable, only the durations are).
    """
    device = next(stage.parameters()).device
    dtype = next(stage.parameters()).dtype
    first, last = rank == 0, rank == n_stages - 1
    ids = input_ids.chunk(microbatches) if first else None
    targets = labels.chunk(microbatches) if last else None
    shape = (*micro_shape, stage.config.n_embd)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    sends: list[dist.P2POp] = []  # what this rank computed last, sent together with the next receive
    intervals: list[Interval] = []
    loss_total = 0.0
    peak = 0

    def now() -> float:  # on a GPU, wait for the queued kernels: time the work, not its launch
        synchronize(device)
        return clock()

    in_flight: list[Any] = []  # sends posted without a receive: waited for at the end

    def exchange(recvs: list[dist.P2POp]) -> None:
        if sends or recvs:
            works = dist.batch_isend_irecv(sends + recvs)
            if recvs:  # this op's input: wait for the whole group (its sends are in the same group)
                for work in works:
                    work.wait()
            else:
                in_flight.extend(works)
        sends.clear()

    dist.barrier()
    t0 = now()
    for op, m in stage_program(kind, n_stages, microbatches, rank):
        if op == "F":
            if first:
                exchange([])
                x = ids[m].to(device)
            else:
                x = torch.empty(shape, device=device, dtype=dtype)
                exchange([dist.P2POp(dist.irecv, x, rank - 1)])
                x.requires_grad_()
            start = now()
            y = stage(x)
            if last:
                y = _summed_loss(y, targets[m].to(device), n_real)
                loss_total += y.item()
            intervals.append(Interval(rank, start - t0, now() - t0, "F", m))
            if not last:
                sends.append(dist.P2POp(dist.isend, y.detach(), rank + 1))
            inputs[m], outputs[m] = x, y
            peak = max(peak, len(outputs))
        else:
            x, y = inputs.pop(m), outputs.pop(m)
            grad = None
            if last:
                exchange([])
            else:
                grad = torch.empty_like(y)
                exchange([dist.P2POp(dist.irecv, grad, rank + 1)])
            start = now()
            y.backward(grad)
            intervals.append(Interval(rank, start - t0, now() - t0, "B", m))
            if not first:
                sends.append(dist.P2POp(dist.isend, x.grad, rank - 1))
    exchange([])
    for work in in_flight:
        work.wait()
    return (loss_total if last else None), intervals, peak


# ------------------------------------------------------------------ torch.distributed.pipelining


def torch_pipeline_step(
    stage: GPTStage, rank: int, n_stages: int, microbatches: int, kind: str,
    input_ids: torch.Tensor, labels: torch.Tensor,
) -> float | None:
    """One training step through ``torch.distributed.pipelining`` (``ScheduleGPipe`` or ``Schedule1F1B``).

    The library does what :func:`run_schedule` does by hand: it splits the batch into
    micro-batches, sends activations and gradients between stages and runs the schedule.
    Each micro-batch's loss is its summed token loss over the batch's real-token count, and
    ``scale_grads=False``, so the gradients are those of the full-batch mean loss. Returns
    that loss on the last stage.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    schedules = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if kind not in schedules:
        raise ValueError(f"torch pipelining schedule must be one of {sorted(schedules)}, got {kind!r}")
    device = next(stage.parameters()).device
    n_real = int((labels != IGNORE_INDEX).sum())
    pipe_stage = PipelineStage(stage, rank, n_stages, device)
    if "scale_grads" not in inspect.signature(schedules[kind].__init__).parameters:
        raise RuntimeError(
            f"torch {torch.__version__}: {schedules[kind].__name__} takes no scale_grads= argument, which this "
            "step needs for the full-batch gradient; the course needs torch >= 2.11 (see pyproject.toml)"
        )
    runner = schedules[kind](pipe_stage, microbatches, loss_fn=partial(_summed_loss, n_real=n_real),
                             scale_grads=False)
    first, last = rank == 0, rank == n_stages - 1
    losses: list[torch.Tensor] = []
    inputs = (input_ids.to(device),) if first else ()  # only stage 0 reads the tokens
    targets = {"target": labels.to(device), "losses": losses} if last else {}  # only the last, the labels
    runner.step(*inputs, **targets)
    return float(sum(loss.item() for loss in losses)) if last else None


