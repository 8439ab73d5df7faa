"""Workers for lesson 14 (ZeRO stages) and its tests: one spawn trains every variant side by side.

Each variant starts from the same GPT weights and trains on this rank's rows of the same global
batches with AdamW; after every step the worker records the full parameters as one flat vector,
so the parent can check that DDP, ZeRO-1/2/3, FSDP2 and ``ZeroRedundancyOptimizer`` take the same
steps as one process on the whole batch. The loss is computed in the model's dtype (float64 in
the tests): ``course_lib.model.lm_loss`` casts logits to float32, which would limit the check to
float32 precision whenever the world size is not a power of two (the 1/N in the mean is inexact).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

from course_lib.distributed.data_parallel import CommTimer, wrap_ddp
from course_lib.distributed.launch import rank_device
from course_lib.distributed.sharding import bytes_per_rank, shard_model
from course_lib.distributed.zero import ZeRO
from course_lib.model import GPT, GPTConfig

VARIANTS = ("ddp", "zero1", "zero2", "zero3", "zero3_keep", "fsdp2", "fsdp2_keep", "zero_redundancy")


def _flat(model: torch.nn.Module) -> torch.Tensor:
    parts = [(p.full_tensor() if isinstance(p, DTensor) else p).detach().flatten() for p in model.parameters()]
    return torch.cat(parts).cpu()


def _loss(run: Any, rows: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in the model's own dtype (``lm_loss`` computes in float32)."""
    logits = run(rows[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())


def train_variant(variant: str, rank: int, world_size: int, config: GPTConfig, state: dict[str, torch.Tensor],
                  batches: list[torch.Tensor], lr: float, weight_decay: float) -> dict[str, Any]:
    """Train one of :data:`VARIANTS` on this rank's rows of ``batches``.

    Returns ``{"params": flat parameters after each step, "bytes": RankBytes after the last step,
    "comm": {collective: bytes handed to it} per step}`` (FSDP2's own collectives are not counted).
    """
    device = rank_device()
    model = GPT(config).to(device=device, dtype=next(iter(state.values())).dtype)
    model.load_state_dict(state)
    adamw = dict(lr=lr, weight_decay=weight_decay)
    timer, zero, optimizer = CommTimer(), None, None
    if variant in ("ddp", "zero_redundancy"):
        run = wrap_ddp(model, device)
        timer.register(run)
        if variant == "ddp":
            optimizer = torch.optim.AdamW(model.parameters(), **adamw)
        else:
            optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **adamw)
    elif variant in ("fsdp2", "fsdp2_keep"):
        run = shard_model(model, reshard_after_forward=variant == "fsdp2")
        optimizer = torch.optim.AdamW(model.parameters(), **adamw)
    else:
        run = zero = ZeRO(model, stage=int(variant[4]), reshard_after_forward=variant != "zero3_keep", **adamw)
    params, comm = [], []
    for batch in batches:
        timer.reset()
        if optimizer is not None:
            optimizer.zero_grad()
        calls_before = len(zero.comm.calls) if zero else 0
        _loss(run, batch.chunk(world_size)[rank].to(device)).backward()
        (zero or optimizer).step()
        if zero is not None:
            comm.append(_count(zero.comm.calls[calls_before:]))
            params.append(torch.cat([v.flatten() for v in zero.full_parameters().values()]).cpu())
        else:
            comm.append({"all_reduce": timer.bytes} if timer.calls else {})
            params.append(_flat(model))
    if zero is not None:
        held = zero.bytes_per_rank()
    elif variant == "zero_redundancy":
        held = bytes_per_rank(model, optimizer.optim)  # the local AdamW holds this rank's share
    else:
        held = bytes_per_rank(model, optimizer)
    return {"params": params, "bytes": held, "comm": comm}


def _count(calls: list[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for op, n in calls:
        out[op] = out.get(op, 0) + n
    return out


def zero_variants_worker(rank: int, world_size: int, config: GPTConfig, state: dict[str, torch.Tensor],
                         batches: list[torch.Tensor], variants: tuple[str, ...] = VARIANTS, lr: float = 1e-2,
                         weight_decay: float = 0.1) -> dict[str, dict[str, Any]]:
    """A :func:`course_lib.distributed.launch.spawn` worker: :func:`train_variant` for each variant."""
    out = {}
    for variant in variants:
        out[variant] = train_variant(variant, rank, world_size, config, state, batches, lr, weight_decay)
        dist.barrier()
    return out


def single_process_params(config: GPTConfig, state: dict[str, torch.Tensor], batches: list[torch.Tensor],
                          lr: float = 1e-2, weight_decay: float = 0.1) -> list[torch.Tensor]:
    """The reference: one process, whole batches, plain AdamW; flat parameters after each step."""
    model = GPT(config).to(dtype=next(iter(state.values())).dtype)
    model.load_state_dict(state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    out = []
    for batch in batches:
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()
        out.append(_flat(model))
    return out



def resharding_worker(rank: int, world_size: int, config: GPTConfig, state: dict[str, torch.Tensor],
                      batch: torch.Tensor) -> dict[bool, tuple[int, int]]:
    """ZeRO-3 with and without ``reshard_after_forward``: gathered bytes alive after forward, after backward."""
    out = {}
    for reshard in (True, False):
        model = GPT(config).to(device=rank_device(), dtype=next(iter(state.values())).dtype)
        model.load_state_dict(state)
        zero = ZeRO(model, stage=3, reshard_after_forward=reshard, lr=1e-2)
        loss = _loss(zero, batch.chunk(world_size)[rank].to(rank_device()))
        after_forward = zero.gathered_bytes
        loss.backward()
        out[reshard] = (after_forward, zero.gathered_bytes)
    return out
