"""The training loop: accumulation, mixed precision, clipping, schedule, eval, checkpoints, resume.

:func:`train` reads top to bottom like nanoGPT's ``train.py``: build the :class:`TrainState`
(model, optimizer, scheduler, scaler, data position, RNG, step), restore it when resuming, then
per step ``forward_backward`` over one window, ``optimizer_step``, and log / evaluate /
checkpoint when due. What differs between one process, DDP and FSDP2 is asked of a
:class:`course_lib.parallel.Parallelism`; saving and restoring is
:class:`course_lib.train_state.Checkpointer`'s job.

One optimizer **step** consumes one *window* of ``grad_accum`` micro-batches. The loss of the
window is weighted by real tokens (labels != -100) across the whole window and every rank:

    loss = sum over the window (and ranks) of per-token losses / number of real tokens

Each micro-batch's summed loss (``model(..., reduction="sum")``) is multiplied by
``world_size / global real tokens`` before backward (DDP and FSDP2 average the gradients over
ranks; the factor undoes that), so the gradient equals one process's gradient of one big batch
holding every micro-batch of every rank, whatever their lengths. (Dividing each micro-batch's
*mean* by ``grad_accum`` is only right when every micro-batch has the same number of real
tokens: Errata 7.) All micro-steps but the last skip the gradient sync (``no_sync`` /
``set_requires_gradient_sync(False)``): one synchronisation per window.

The logged loss is the global token-weighted mean; only rank 0 logs. Each rank seeds its RNG
with ``seed + rank`` after the weights were synchronised, so dropout differs between ranks, and
a checkpoint holds every rank's RNG and data position, so each rank resumes its own stream.

A **trailing partial window** (the data ends before ``grad_accum`` micro-batches) is still
stepped, weighted by its own real tokens; the step where the data ends (partial or exactly at a
window boundary) is the last one: it is logged, evaluated and checkpointed. Under DDP every rank
must see the same number of micro-batches; a mismatch raises instead of hanging.

The host waits for the device only on logged steps (``log_every``): losses and gradient norms
stay on the device in between. On CUDA batches are copied from pinned memory one batch ahead,
and fp32 matmuls use TF32 on Ampere or newer GPUs (logged once).

Exact resume: after ``train(..., resume=True)`` the logged losses equal an uninterrupted run's
bit for bit. The data source must be able to say where it is (see
:class:`course_lib.train_state.DataPosition`); ``train`` refuses to checkpoint one that cannot.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from course_lib.device import synchronize
from course_lib.distributed.faults import maybe_inject_fault
from course_lib.distributed.launch import get_rank
from course_lib.monitoring import mfu
from course_lib.parallel import Parallelism, parallelism_for, real_tokens, unwrap
from course_lib.precision import DTYPES, autocast, make_grad_scaler
from course_lib.schedulers import warmup_cosine
from course_lib.train_state import Checkpointer, DataPosition, TrainState, check_resume_config

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "accumulate_gradients", "make_optimizer", "seed_everything",
           "compile_model", "compiler_problem"]


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
        compile: compile the model once with ``torch.compile`` before training (see
            :func:`compile_model`); checkpoints stay interchangeable with eager runs.
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
    compile: bool = False

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


OptimizerArg = torch.optim.Optimizer | Callable[[nn.Module], torch.optim.Optimizer] | None


def _build_optimizer(optimizer: OptimizerArg, model: nn.Module, config: TrainConfig,
                     device: torch.device) -> torch.optim.Optimizer:
    """``optimizer`` itself, ``optimizer(model)`` for a factory, or :func:`make_optimizer`."""
    if optimizer is None:
        return make_optimizer(model, config, device)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        built = optimizer(model)
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned {type(built).__name__}, not a torch.optim.Optimizer")
        return built
    raise TypeError("optimizer= takes a torch.optim.Optimizer or a function model -> Optimizer, "
                    f"not {type(optimizer).__name__}")


# --------------------------------------------------------------------------- compile and TF32

_COMPILER_ERROR: list[str | None] = []  # filled by the first probe: [None] = works, [reason] = does not


def compiler_problem() -> str | None:
    """Why ``torch.compile`` does not work here, or ``None`` when it does.

    Probed once per process by compiling and running a two-op function (the first call takes
    a few seconds).
    """
    if not _COMPILER_ERROR:
        try:
            fn = torch.compile(lambda x: torch.sin(x) * 2 + 1)
            fn(torch.ones(4))
            _COMPILER_ERROR.append(None)
        except Exception as e:  # noqa: BLE001 - any failure means: no working compiler here
            _COMPILER_ERROR.append(" ".join(str(e).split())[:300] or type(e).__name__)
    return _COMPILER_ERROR[0]


def compile_model(model: nn.Module) -> nn.Module:
    """Compile ``model`` in place with ``torch.compile`` (``nn.Module.compile``) and return it.

    In place, so ``model.state_dict()`` keeps its keys (no ``_orig_mod.`` prefix) and a
    checkpoint of a compiled run loads into an eager model and back. Works under DDP (the
    wrapped module is compiled) and with LoRA. Raises ``RuntimeError`` naming the cause where
    the platform has no working compiler (probed once per process).
    """
    reason = compiler_problem()
    if reason is not None:
        raise RuntimeError(f"torch.compile does not work on this platform ({reason}); "
                           "train without compile=True / --compile")
    unwrap(model).compile()
    return model


def _allow_tf32(device: torch.device, precision: str) -> bool:
    """Let fp32 matmuls use TF32 tensor cores on Ampere+ GPUs (10-bit mantissa inputs, fp32 sums)."""
    if device.type != "cuda" or precision != "fp32" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


# --------------------------------------------------------------------------- the step, in pieces


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
    A sharded (FSDP2) model must be evaluated on every rank (its forward gathers weights).
    """
    model = unwrap(model)  # DDP's module (evaluation needs no gradient sync); an FSDP2 model is itself
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            count += real_tokens(batch["labels"])
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, precision):
                out = model(batch["input_ids"], reduction="sum", **_forward_kwargs(batch))
            total += out.loss.double()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate() got no real tokens: the eval batches are empty or all labels are -100")
    return total.item() / count


def forward_backward(model: nn.Module, window: Sequence[Mapping[str, torch.Tensor]], global_real: int,
                     parallel: Parallelism, scaler: torch.amp.GradScaler, precision: str) -> torch.Tensor:
    """Forward and backward every micro-batch of a window; return this rank's summed loss.

    The returned loss stays on the device (no host sync); the gradient sync runs only on the
    last micro-step.
    """
    loss_sum = torch.zeros((), device=parallel.device)
    factor = parallel.loss_scale(global_real)
    for i, batch in enumerate(window):
        with parallel.micro_step(model, last=i == len(window) - 1):
            with autocast(parallel.device, precision):
                out = model(batch["input_ids"], reduction="sum", **_forward_kwargs(batch))
            scaler.scale(out.loss * factor).backward()
        loss_sum += out.loss.detach()
    return loss_sum


def optimizer_step(state: TrainState, params: Sequence[torch.Tensor], clip: float | None) -> torch.Tensor:
    """Clip the (unscaled) gradients, step (skipped by the scaler on an fp16 overflow), zero the
    gradients, advance the schedule; return the gradient norm before clipping (on the device)."""
    grad_norm = state.parallel.clip_grad_norm(params, clip or math.inf)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    return grad_norm


def accumulate_gradients(model: nn.Module, window: Sequence[Mapping[str, torch.Tensor]], *,
                         precision: str = "fp32", device: torch.device | str | None = None,
                         scaler: torch.amp.GradScaler | None = None) -> float:
    """Backward one accumulation window exactly as :func:`train` does; return its mean loss.

    Afterwards ``p.grad`` holds the gradient of the token-weighted mean loss over the whole
    window: the same as one batch holding every micro-batch, even when they hold different
    numbers of real tokens (and, under DDP or FSDP2, the same as one process holding every
    rank's batches). Gradients are added to any already in ``p.grad``.

    fp16 needs loss scaling (small gradients underflow to zero in fp16): pass ``scaler`` (e.g.
    ``make_grad_scaler(device, "fp16")``); the gradients are then *scaled*, so call
    ``scaler.unscale_(optimizer)`` before reading or clipping them, as :func:`train` does.
    """
    if precision == "fp16" and (scaler is None or not scaler.is_enabled()):
        raise ValueError("precision='fp16' needs loss scaling, or small gradients underflow to zero: pass "
                         "scaler=course_lib.precision.make_grad_scaler(device, 'fp16') and call "
                         "scaler.unscale_(optimizer) before using the gradients (or use bf16)")
    device = torch.device(device) if device is not None else next(unwrap(model).parameters()).device
    parallel = parallelism_for(model, device)
    local = sum(real_tokens(b["labels"]) for b in window)
    real, _, _, _ = parallel.window_counts(local, sum(b["input_ids"].numel() for b in window), len(window))
    if real == 0:
        raise ValueError("the window has no real tokens (every label is -100)")
    moved = [{k: v.to(device) for k, v in b.items()} for b in window]
    scaler = scaler if scaler is not None else make_grad_scaler(device, "fp32")
    loss_sum = forward_backward(model, moved, real, parallel, scaler, precision)
    return (parallel.sum(loss_sum) / real).item()


class _Meter:
    """Tokens and time since the last record (time spent checkpointing or evaluating excluded)."""

    def __init__(self) -> None:
        self.inputs, self.t0 = 0, time.perf_counter()

    def rate(self, device: torch.device) -> float:
        synchronize(device)  # one host sync per logged step: GPU work is asynchronous
        return self.inputs / max(time.perf_counter() - self.t0, 1e-9)

    def reset(self) -> None:
        self.inputs, self.t0 = 0, time.perf_counter()


def _log_record(state: TrainState, config: TrainConfig, loss_sum: torch.Tensor, real: int, grad_norm: torch.Tensor,
                lr: float, meter: _Meter, flops_per_token: float | None) -> dict[str, Any]:
    """The metrics of one logged step (the only place the loop reads device values)."""
    record: dict[str, Any] = {
        "step": state.step, "loss": (state.parallel.sum(loss_sum) / real).item(), "lr": lr,
        "grad_norm": grad_norm.item(), "tokens_per_s": meter.rate(state.parallel.device), "tokens": real,
    }
    if config.peak_flops and flops_per_token is not None:
        record["mfu"] = mfu(record["tokens_per_s"], flops_per_token, config.peak_flops * state.parallel.world_size)
    if config.precision == "fp16":
        record["loss_scale"] = state.scaler.get_scale()
    return record


# --------------------------------------------------------------------------- train()


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
    optimizer: OptimizerArg = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    compile: bool | None = None,
) -> TrainResult:
    """Train ``model`` on ``batches`` following ``config``; see the module docstring.

    Args:
        model: a ``course_lib.model.GPT`` (or any module called as ``model(input_ids,
            labels=..., reduction="sum")`` returning ``.loss``): plain, DDP-wrapped
            (:func:`course_lib.parallel.apply_ddp`) or sharded with FSDP2
            (:func:`course_lib.parallel.apply_fsdp`).
        batches: iterable of ``{"input_ids", "labels"[, "attention_mask"]}`` micro-batches
            on the host, e.g. ``course_lib.data.RandomWindowBatches``, a list, or a
            ``DataLoader``; with ``config.out_dir`` it must be resumable
            (:class:`course_lib.train_state.DataPosition`).
        config: a :class:`TrainConfig`.
        eval_data: a re-iterable sequence of eval batches (a list, not a one-shot iterator).
        loggers: objects with ``log(metrics, step)`` (``course_lib.monitoring``); rank 0 only.
            ``train`` does not close them.
        device: where to train (default: where the model's parameters are).
        resume: ``True`` = continue from the newest checkpoint in ``config.out_dir`` (as rank 0
            sees it); a path = continue from that checkpoint; ``False`` = fresh run.
        extra_state: plain data stored in every checkpoint under ``"extra"`` (e.g. the model
            config, so the checkpoint can rebuild its model).
        optimizer: an optimizer over ``model``'s parameters, or a function ``model ->
            optimizer`` (muP parameter groups, Muon...); default :func:`make_optimizer`. The
            schedule multiplies every group's own learning rate.
        scheduler: a function ``optimizer -> LR scheduler`` (e.g. a
            :func:`course_lib.schedulers.warmup_stable_decay`); default warmup + cosine from
            ``config``. It must have ``state_dict`` / ``load_state_dict`` for checkpoints.
        compile: compile the model once before training (default ``config.compile``).

    Returns:
        A :class:`TrainResult` with the logged history.
    """
    device = torch.device(device) if device is not None else next(unwrap(model).parameters()).device
    parallel = parallelism_for(model, device)
    if parallel.name == "single":
        model.to(device)
    if eval_data is not None and iter(eval_data) is eval_data:
        raise ValueError("eval_data must be re-iterable (a list of batches), not a one-shot iterator; "
                         "wrap it in list(...)")
    if config.compile if compile is None else compile:
        compile_model(model)
    loggers = list(loggers or []) if parallel.is_writer else []
    if _allow_tf32(device, config.precision) and parallel.is_writer:
        print("fp32 matmuls use TF32 tensor cores on this GPU (torch.backends.cuda.matmul.allow_tf32)", flush=True)

    # ---- the state a checkpoint holds, restored when resuming
    optim = _build_optimizer(optimizer, model, config, device)
    state = TrainState(
        model=model, optimizer=optim,
        scheduler=(warmup_cosine(optim, config.warmup_steps, config.steps, config.min_lr_ratio)
                   if scheduler is None else scheduler(optim)),
        scaler=make_grad_scaler(device, config.precision),
        data=DataPosition(batches, device, resumable_required=config.out_dir is not None),
        parallel=parallel,
    )
    checkpointer = Checkpointer(config.out_dir, config.keep_checkpoints, parallel)
    result = TrainResult()
    path = checkpointer.choose(resume)
    if path is not None:
        checkpointer.load(path, state, check=lambda saved: check_resume_config(saved, config.to_dict(), path))
        result.step = result.resumed_from = state.step
        result.checkpoint = path
    else:
        seed_everything(config.seed + parallel.rank)  # after the weights are in sync: own dropout per rank

    flops_per_token = getattr(unwrap(model), "flops_per_token", None)
    seq_flops = None
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=config.steps, initial=state.step, desc="train", unit="step",
               disable=not (config.progress and parallel.is_writer), dynamic_ncols=True)
    meter = _Meter()
    model.train()

    for step in range(state.step + 1, config.steps + 1):
        maybe_inject_fault(step, get_rank())  # no-op unless a fault-tolerance test asks for a kill
        window = state.data.next_window(config.grad_accum)
        real, inputs, n_micro, data_ends = parallel.window_counts(
            sum(r for _, r, _ in window), sum(n for _, _, n in window), len(window), state.data.exhausted())
        if n_micro == 0:
            break  # nothing left (a resumed run whose data had already ended)
        if real == 0:
            raise ValueError(f"step {step}: every label in the window is -100, there is nothing to learn from")
        lr = state.scheduler.get_last_lr()[0]

        loss_sum = forward_backward(model, [b for b, _, _ in window], real, parallel, state.scaler, config.precision)
        state.scaler.unscale_(state.optimizer)  # clip and measure the true gradients, not the scaled ones
        layer_norms = {}
        if config.per_layer_grad_norm_every and step % config.per_layer_grad_norm_every == 0 and not parallel.sharded:
            from course_lib.monitoring import grad_norms

            layer_norms = {k: v for k, v in grad_norms(unwrap(model), per_layer=True).items() if k != "grad_norm"}
        grad_norm = optimizer_step(state, params, config.clip_grad_norm)
        state.step = result.step = step
        meter.inputs += inputs
        bar.update(1)

        last = step == config.steps or data_ends  # the data ends with this step (partial window or not)
        evaluating = eval_data is not None and (last or (config.eval_every and step % config.eval_every == 0))
        if step % config.log_every == 0 or last or evaluating:
            if seq_flops is None and flops_per_token is not None:
                seq_flops = flops_per_token(window[0][0]["input_ids"].shape[1])
            record = _log_record(state, config, loss_sum, real, grad_norm, lr, meter, seq_flops)
            record.update(layer_norms)
            if evaluating:
                # every rank evaluates the same batches (an FSDP2 forward needs all of them)
                record["val_loss"] = result.val_loss = evaluate(
                    model, eval_data, device=device, precision=config.precision, max_batches=config.eval_batches)
            result.history.append(record)
            for logger in loggers:
                logger.log({k: v for k, v in record.items() if k != "step"}, step=step)
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            meter.reset()
        if config.out_dir is not None and (last or (config.checkpoint_every and step % config.checkpoint_every == 0)):
            result.checkpoint = checkpointer.save(state, config=config.to_dict(), extra=dict(extra_state or {}))
            meter.t0 = time.perf_counter()  # do not count checkpoint time as training time
        if last:
            break
    bar.close()
    return result
