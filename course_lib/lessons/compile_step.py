"""Lesson 12's whole-model measurement: one training step of the course GPT, eager against compiled.

Used live by the notebook on a GPU and, on a CPU (where compiling the training step takes
minutes), by ``scripts/compile_benchmark.py``, which caches the result for the notebook.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from course_lib.model import GPT, GPTConfig
from course_lib.profiling import group_times, paired_speedup, paired_times
from course_lib.training import TrainConfig, make_optimizer


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
              bf16: bool = False) -> Callable[[], float]:
    """One training step (forward, backward, AdamW, zero_grad) on next-token targets of ``ids``; returns the loss."""

    def step() -> float:
        with record_function("data"):
            x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, labels=y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def compare_compiled(config: GPTConfig, batch: int, device: torch.device | str = "cpu", reps: int = 15,
                     warmup: int = 2, bf16: bool = False, seed: int = 0) -> dict[str, Any]:
    """Time eager against ``torch.compile`` on twin models; compile time, paired speed-up, loss check, profile shares."""
    device = torch.device(device)
    torch.manual_seed(seed)
    eager = GPT(config).to(device)
    twin = copy.deepcopy(eager)
    ids = torch.randint(0, config.vocab_size, (batch, config.block_size + 1), device=device)
    steps = {}
    for key, model in (("eager", eager), ("compiled", twin)):
        model.train()
        opt = make_optimizer(model, TrainConfig(), device)
        steps[key] = make_step(torch.compile(model) if key == "compiled" else model, opt, ids, bf16)
    losses, first = {}, {}
    for key, fn in steps.items():  # the first compiled call traces the step and generates its code
        t0 = time.perf_counter()
        losses[key] = float(fn())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first[key] = time.perf_counter() - t0
    times = paired_times(steps, reps=reps, warmup=warmup, device=device)
    ratio, low, high = paired_speedup(times["eager"], times["compiled"])
    shares = {}
    for key, fn in steps.items():
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            fn()
        t = group_times(prof.events(), "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total")
        shares[key] = {g: v / sum(t.values()) for g, v in t.items()}
    steady = statistics.median(times["compiled"])
    tokens = batch * config.block_size
    return {
        "config": config.to_dict(), "batch": batch, "device": str(device), "bf16": bf16,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "reps": reps,
        "first_step_loss": losses, "compile_s": first["compiled"] - steady,
        "eager_step_s": statistics.median(times["eager"]), "compiled_step_s": steady,
        "eager_tok_s": tokens / statistics.median(times["eager"]), "compiled_tok_s": tokens / steady,
        "speedup": ratio, "speedup_low": low, "speedup_high": high, "profile_shares": shares,
    }
