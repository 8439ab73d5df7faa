"""Lesson 02's FSDP2 worker: train a GPT sharded with :func:`course_lib.distributed.sharding.shard_model`."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from course_lib.distributed.launch import rank_device
from course_lib.distributed.sharding import bytes_per_rank, shard_model
from course_lib.model import GPT


def fsdp_train_worker(rank: int, world_size: int, config: Any, state: dict[str, torch.Tensor],
                      batches: list[torch.Tensor], lr: float = 1e-2) -> dict[str, Any]:
    """Train a :class:`course_lib.model.GPT` with FSDP2 for ``len(batches)`` AdamW steps.

    A worker for :func:`course_lib.distributed.launch.spawn`. Every rank builds the same model
    from ``config`` and ``state`` (in the state's dtype, on this rank's device), shards it with
    :func:`~course_lib.distributed.sharding.shard_model`, and on each step takes its own equal slice of the rows of the global
    batch (``(B, T+1)`` token ids: inputs are ``[:, :-1]``, targets ``[:, 1:]``). FSDP averages the gradients over
    ranks, so with equal token counts per rank the run equals one process on the whole batch.

    Returns:
        ``{"losses": global mean loss per step, "bytes": RankBytes after the last step,
        "state": the final full (unsharded) state dict}``.
    """
    device = rank_device()
    model = GPT(config).to(device=device, dtype=next(iter(state.values())).dtype)
    model.load_state_dict(state)
    shard_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for batch in batches:
        if batch.size(0) % world_size != 0:
            raise ValueError(
                f"a global batch of {batch.size(0)} rows cannot be split evenly over {world_size} ranks: "
                f"use a multiple of {world_size} rows per batch, or fewer ranks"
            )
        local = batch.chunk(world_size)[rank].to(device)
        optimizer.zero_grad()
        loss = model(local[:, :-1], labels=local[:, 1:]).loss
        loss.backward()
        optimizer.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)  # the logged loss is the mean over ranks, not rank 0's
        losses.append(global_loss.item() / world_size)
    used = bytes_per_rank(model, optimizer)
    full_state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in model.state_dict().items()}
    return {"losses": losses, "bytes": used, "state": full_state}

