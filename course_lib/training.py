"""The training loop: accumulation, mixed precision, clipping, schedule, eval, checkpoints, resume.

One optimizer **step** consumes one *window* of ``grad_accum`` micro-batches. The loss of the
window is weighted by real tokens (labels != -100) across the whole window:

    loss = sum over the window of per-token losses / number of real tokens in the window

Each micro-batch's summed loss (``model(..., reduction="sum")``) is divided by the window's
token count *before* backward, so the gradient equals the gradient of one big batch holding
every micro-batch, whatever their lengths. (Dividing each micro-batch's *mean* by
``grad_accum`` is only right when every micro-batch has the same number of real tokens:
Errata 7.)

Under DDP (a ``DistributedDataParallel`` model and an initialised process group):

* all micro-steps but the last run under ``model.no_sync()``: one all-reduce per window;
* the token count is all-reduced, so every rank divides by the *global* count, and the loss is
  multiplied by the world size to undo DDP's gradient averaging: the gradients equal the
  single-process gradient of the global batch;
* the logged loss is the global token-weighted mean (not rank 0's local loss);
* only rank 0 logs and writes checkpoints; each checkpoint holds the RNG and data position of
  *every* rank (gathered), so each rank resumes its own stream.

A **trailing partial window** (the batch iterator ends before ``grad_accum`` micro-batches) is
still stepped: its loss is divided by its own real-token count, so it is a correctly weighted
(smaller) batch. Training then stops early; ``TrainResult.step`` says where. Under DDP every
rank must see the same number of micro-batches (a ``DistributedSampler`` does this); a
mismatch raises instead of hanging.

Exact resume: a checkpoint holds model, optimizer, scheduler, GradScaler, RNG states, the batch
iterator's ``state_dict()`` and the step; after ``train(..., resume=True)`` the logged losses
equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from course_lib.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    load_pretrained,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from course_lib.distributed.faults import maybe_inject_fault
from course_lib.model import IGNORE_INDEX
from course_lib.monitoring import mfu
from course_lib.precision import DTYPES, autocast, make_grad_scaler
from course_lib.schedulers import warmup_cosine

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "accumulate_gradients", "make_optimizer", "seed_everything",
           "load_pretrained"]

# Settings whose change would make a resumed run a different run.
_RESUME_KEYS = ("steps", "lr", "weight_decay", "betas", "eps", "warmup_steps", "min_lr_ratio",
                "grad_accum", "clip_grad_norm", "precision", "seed")


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        steps: optimizer steps to run (each consumes ``grad_accum`` micro-batches).
        lr: peak learning rate (after warmup).
        weight_decay: AdamW decay, applied to 2-D weights only (not biases, norms).
        betas, eps: AdamW moments.
        warmup_steps: linear warmup length (0 = none).
        min_lr_ratio: cosine floor as a fraction of ``lr``.
        grad_accum: micro-batches per optimizer step.
        clip_grad_norm: clip the global gradient norm to this (``None`` = no clipping; the norm
            is still measured and logged).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (fp16 adds a GradScaler).
        eval_every: evaluate on ``eval_data`` every N steps and at the end (0 = only at the end).
        eval_batches: at most this many eval batches per evaluation.
        checkpoint_every: write a checkpoint every N steps (0 = only at the end); needs ``out_dir``.
        keep_checkpoints: how many of the newest checkpoints to keep.
        log_every: log metrics every N steps (and at the last step).
        per_layer_grad_norm_every: also log per-block gradient norms every N steps (0 = never);
            they cost one host sync, so sample them rather than logging them every step.
        out_dir: where checkpoints go (``None`` = no checkpoints).
        seed: seeds python, numpy and torch at the start of a fresh run (dropout, sampling).
        peak_flops: the device's peak FLOP/s; when given, ``mfu`` is logged.
        progress: show a tqdm progress bar (rank 0 only).
    """

    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    clip_grad_norm: float | None = 1.0
    precision: str = "fp32"
    eval_every: int = 0
    eval_batches: int = 20
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    per_layer_grad_norm_every: int = 0
    out_dir: str | None = None
    seed: int = 0
    peak_flops: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("steps", "grad_accum", "log_every", "eval_batches", "keep_checkpoints"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "per_layer_grad_norm_every"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        self.betas = tuple(self.betas)  # a list from JSON becomes a tuple again
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.warmup_steps <= self.steps,
             f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}; use fewer warmup steps")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.clip_grad_norm is None or self.clip_grad_norm > 0,
             f"clip_grad_norm must be positive or None (no clipping), got {self.clip_grad_norm}")
        need(self.precision in DTYPES, f"precision must be one of {sorted(DTYPES)}, got {self.precision!r}")
        need(self.peak_flops is None or self.peak_flops > 0, f"peak_flops must be positive, got {self.peak_flops}")
        need(self.checkpoint_every == 0 or self.out_dir is not None,
             "checkpoint_every needs out_dir: set out_dir to the folder the checkpoints go to")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what checkpoints store; never the dataclass itself)."""
        return json.loads(json.dumps(asdict(self)))


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        history: every logged record (``step``, ``loss``, ``lr``, ``grad_norm``,
            ``tokens_per_s``, ``tokens``; ``val_loss`` at eval steps; ``mfu`` with a peak).
        step: the last optimizer step taken.
        val_loss: the last validation loss (``None`` without ``eval_data``).
        checkpoint: the last checkpoint written (``None`` without ``out_dir``).
        resumed_from: the step the run resumed from (0 for a fresh run).
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    val_loss: float | None = None
    checkpoint: Path | None = None
    resumed_from: int = 0

    def values(self, key: str) -> list[float]:
        """``[record[key] for each logged record that has it]``, e.g. ``result.values("loss")``."""
        return [r[key] for r in self.history if key in r]


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device | str = "cpu") -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on 2-D weights only.

    Biases and LayerNorm gains are not decayed (decaying them only hurts). The tied
    embedding/head matrix appears once. On CUDA and CPU the fused kernel is used: one kernel
    for the whole update, about 5x faster than the default multi-tensor path on CPU
    (``benchmarks/optimizers.py``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = True if torch.device(device).type in ("cuda", "cpu") else None
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward_kwargs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kwargs = {"labels": batch["labels"]}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    return kwargs


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, device: torch.device | str | None = None,
             precision: str = "fp32", max_batches: int | None = None) -> float:
    """Token-weighted mean loss over ``batches`` (every real token counts the same).

    The model is put in eval mode (no dropout) and restored to its previous mode afterwards.
    """
    model = _unwrap(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            batch = _to(batch, device)
            with autocast(device, precision):
                out = model(batch["input_ids"], reduction="sum", **_forward_kwargs(batch))
            total += out.loss.double()
            count += int((batch["labels"] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate() got no real tokens: the eval batches are empty or all labels are -100")
    return total.item() / count


def _next_window(it: Iterator[Any], k: int) -> list[Any]:
    window = []
    for _ in range(k):
        try:
            window.append(next(it))
        except StopIteration:
            break
    return window


class _Dist:
    """The process-group facts the loop needs (world size 1 when not distributed)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        self.ddp = isinstance(model, DistributedDataParallel)
        if self.ddp and not initialised:
            raise ValueError("the model is wrapped in DistributedDataParallel but no process group is initialised")
        # Collectives (global token counts, x world size) only for a DDP model: a plain model in a
        # process group trains on its own and must not have its gradients scaled by the world size.
        self.active = self.ddp
        self.rank = dist.get_rank() if initialised else 0
        self.world = dist.get_world_size() if self.ddp else 1
        self.device = device

    def window_counts(self, real: int, inputs: int, n_micro: int) -> tuple[int, int, int]:
        """Global real tokens, global input tokens and this window's micro-batch count."""
        if not self.active:
            return real, inputs, n_micro
        # one collective per window: every rank's (real, inputs, micro-batches)
        mine = torch.tensor([real, inputs, n_micro], dtype=torch.int64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        counts = torch.stack(every).cpu()
        most, fewest = int(counts[:, 2].max()), int(counts[:, 2].min())
        if most != fewest:
            raise RuntimeError(
                f"ranks disagree on the window size ({fewest} to {most} micro-batches): every rank "
                "must get the same number of batches (use a DistributedSampler / equal shards)"
            )
        return int(counts[:, 0].sum()), int(counts[:, 1].sum()), n_micro

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.active:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (a list of one when not distributed)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def _backward_window(model: nn.Module, window: Sequence[Mapping[str, torch.Tensor]], real: int, group: _Dist,
                     scaler: torch.amp.GradScaler, precision: str) -> torch.Tensor:
    """Forward and backward every micro-batch; return this rank's summed (detached) loss."""
    loss_sum = torch.zeros((), device=group.device)
    for i, batch in enumerate(window):
        batch = _to(batch, group.device)
        sync = not group.ddp or i == len(window) - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(group.device, precision):
                out = model(batch["input_ids"], reduction="sum", **_forward_kwargs(batch))
            # summed loss / GLOBAL real tokens, times world size to undo DDP's gradient averaging
            scaler.scale(out.loss * (group.world / real)).backward()
        loss_sum += out.loss.detach()
    return loss_sum


def accumulate_gradients(model: nn.Module, window: Sequence[Mapping[str, torch.Tensor]], *,
                         precision: str = "fp32", device: torch.device | str | None = None) -> float:
    """Backward one accumulation window exactly as :func:`train` does; return its mean loss.

    Afterwards ``p.grad`` holds the gradient of the token-weighted mean loss over the whole
    window: the same as one batch holding every micro-batch, even when they hold different
    numbers of real tokens (and, under DDP, the same as one process holding every rank's
    batches). Gradients are added to any already in ``p.grad``.
    """
    device = torch.device(device) if device is not None else next(_unwrap(model).parameters()).device
    group = _Dist(model, device)
    local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in window)
    real, _, _ = group.window_counts(local, sum(b["input_ids"].numel() for b in window), len(window))
    if real == 0:
        raise ValueError("the window has no real tokens (every label is -100)")
    loss_sum = _backward_window(model, window, real, group, make_grad_scaler(device, "fp32"), precision)
    return (group.sum(loss_sum) / real).item()


def _data_state(batches: Any) -> Any:
    return batches.state_dict() if hasattr(batches, "state_dict") else None


def _check_resume_config(saved: Mapping[str, Any], config: TrainConfig, path: Path) -> None:
    now = config.to_dict()
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in _RESUME_KEYS if saved.get(k) != now[k]]
    if changed:
        raise ValueError(
            f"cannot resume from {path}: these settings differ from the checkpoint's ({'; '.join(changed)}). "
            "Resume with the same settings, or start a new run in another directory."
        )


def train(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: TrainConfig,
    *,
    eval_data: Sequence[Mapping[str, torch.Tensor]] | None = None,
    loggers: Sequence[Any] | None = None,
    device: torch.device | str | None = None,
    resume: bool | str | os.PathLike = False,
    extra_state: Mapping[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``batches`` following ``config``; see the module docstring.

    Args:
        model: a ``course_lib.model.GPT`` (or any module called as ``model(input_ids,
            labels=..., reduction="sum")`` returning ``.loss``), optionally DDP-wrapped.
        batches: iterable of ``{"input_ids", "labels"[, "attention_mask"]}`` micro-batches,
            e.g. ``course_lib.data.RandomWindowBatches``. Its ``state_dict()`` (when present)
            is saved in checkpoints so a resumed run sees the same data.
        config: a :class:`TrainConfig`.
        eval_data: a re-iterable sequence of eval batches (a list, not a one-shot iterator).
        loggers: objects with ``log(metrics, step)`` (``course_lib.monitoring``); rank 0 only.
            ``train`` does not close them.
        device: where to train (default: where the model's parameters are).
        resume: ``True`` = continue from the newest checkpoint in ``config.out_dir``; a path =
            continue from that checkpoint; ``False`` = fresh run.
        extra_state: plain data stored in every checkpoint under ``"extra"`` (e.g. the model
            config, so the checkpoint can rebuild its model).
        optimizer: an optimizer over the model's parameters, or a function ``model -> optimizer``
            (muP groups, Muon); default :func:`make_optimizer` from ``config``. The schedule
            multiplies every group's own learning rate.
        scheduler: a function ``optimizer -> LR scheduler`` (e.g. a
            :func:`course_lib.schedulers.warmup_stable_decay`); default warmup + cosine from
            ``config``. It must have ``state_dict`` / ``load_state_dict`` for checkpoints.

    Returns:
        A :class:`TrainResult` with the logged history.
    """
    raw = _unwrap(model)
    device = torch.device(device) if device is not None else next(raw.parameters()).device
    if not isinstance(model, DistributedDataParallel):
        model.to(device)
    group = _Dist(model, device)
    if eval_data is not None and iter(eval_data) is eval_data:
        raise ValueError("eval_data must be re-iterable (a list of batches), not a one-shot iterator; "
                         "wrap it in list(...)")
    loggers = list(loggers or []) if group.rank == 0 else []

    if optimizer is None:
        optimizer = make_optimizer(model, config, device)
    elif not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model)
    scheduler = (warmup_cosine(optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)
                 if scheduler is None else scheduler(optimizer))
    scaler = make_grad_scaler(device, config.precision)
    result = TrainResult()

    if resume:
        path = Path(resume) if not isinstance(resume, bool) else (
            latest_checkpoint(config.out_dir) if config.out_dir else None)
        if path is None:
            raise FileNotFoundError(f"resume=True but there is no checkpoint in out_dir={config.out_dir!r}")
        state = load_checkpoint(path, map_location="cpu")
        _check_resume_config(state["config"], config, path)
        if len(state["rng"]) != group.world:
            raise ValueError(f"{path} was written by {len(state['rng'])} rank(s); resume it with the same "
                             f"number of processes, not {group.world}")
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        data = state["data"][group.rank]
        if data is not None:
            if not hasattr(batches, "load_state_dict"):
                raise ValueError("the checkpoint holds a data position but `batches` has no load_state_dict(); "
                                 "pass the same kind of batch iterator as the interrupted run")
            batches.load_state_dict(data)
        set_rng_state(state["rng"][group.rank])
        result.step = result.resumed_from = int(state["step"])
        result.checkpoint = path
    else:
        seed_everything(config.seed)

    flops_per_token = getattr(raw, "flops_per_token", None)
    params = [p for p in model.parameters() if p.requires_grad]
    data_iter = iter(batches)
    bar = tqdm(total=config.steps, initial=result.step, desc="train", unit="step",
               disable=not (config.progress and group.rank == 0), dynamic_ncols=True)
    inputs_since_log, seq_len = 0, None
    t_last = time.perf_counter()
    model.train()

    for step in range(result.step + 1, config.steps + 1):
        maybe_inject_fault(step, group.rank)  # no-op unless a fault-tolerance test asks for a kill
        window = _next_window(data_iter, config.grad_accum)
        real = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in window)
        inputs = sum(b["input_ids"].numel() for b in window)
        real, inputs, n_micro = group.window_counts(real, inputs, len(window))
        if n_micro == 0:
            break  # the data ran out exactly at a window boundary
        if real == 0:
            raise ValueError(f"step {step}: every label in the window is -100, there is nothing to learn from")
        seq_len = window[0]["input_ids"].shape[1]
        lr = scheduler.get_last_lr()[0]
        loss_sum = _backward_window(model, window, real, group, scaler, config.precision)
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        layer_norms = {}
        if config.per_layer_grad_norm_every and step % config.per_layer_grad_norm_every == 0:
            from course_lib.monitoring import grad_norms

            layer_norms = {k: v for k, v in grad_norms(raw, per_layer=True).items() if k != "grad_norm"}
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm or math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        result.step = step
        inputs_since_log += inputs
        bar.update(1)

        last = step == config.steps or len(window) < config.grad_accum
        if step % config.log_every == 0 or last or (config.eval_every and step % config.eval_every == 0):
            loss = (group.sum(loss_sum) / real).item()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            record: dict[str, Any] = {
                "step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": inputs_since_log / max(now - t_last, 1e-9), "tokens": real,
            }
            if config.peak_flops and flops_per_token is not None:
                record["mfu"] = mfu(record["tokens_per_s"], flops_per_token(seq_len), config.peak_flops * group.world)
            if config.precision == "fp16":
                record["loss_scale"] = scaler.get_scale()
            record.update(layer_norms)
            if eval_data is not None and (last or (config.eval_every and step % config.eval_every == 0)):
                # every rank evaluates the same batches on its (identical) model: no communication
                record["val_loss"] = result.val_loss = evaluate(
                    raw, eval_data, device=device, precision=config.precision, max_batches=config.eval_batches)
            result.history.append(record)
            for logger in loggers:
                logger.log({k: v for k, v in record.items() if k != "step"}, step=step)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            inputs_since_log = 0
            t_last = time.perf_counter()

        if config.out_dir is not None and (last or (config.checkpoint_every and step % config.checkpoint_every == 0)):
            result.checkpoint = _save(config, group, raw, optimizer, scheduler, scaler, batches, step, extra_state)
            t_last = time.perf_counter()  # do not count checkpoint time as training time
        if len(window) < config.grad_accum:
            break  # trailing partial window: stepped above, and the data is exhausted
    bar.close()
    return result


def _save(config: TrainConfig, group: _Dist, raw: nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: Any, scaler: torch.amp.GradScaler, batches: Any, step: int,
          extra_state: Mapping[str, Any] | None) -> Path:
    rngs = group.gather(rng_state())
    data = group.gather(_data_state(batches))
    path = checkpoint_path(config.out_dir, step)
    if group.rank == 0:
        save_checkpoint(
            path,
            model=raw.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(),
            rng=rngs,
            data=data,
            step=step,
            config=config.to_dict(),
            extra=dict(extra_state or {}),
        )
        prune_checkpoints(config.out_dir, config.keep_checkpoints)
    if group.active:
        dist.barrier()  # no rank runs ahead of a checkpoint that is still being written
    return path
