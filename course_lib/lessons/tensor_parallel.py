"""Lesson 02's tensor-parallel worker: one :class:`course_lib.model.Block` sharded by hand and with DTensor."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from course_lib.distributed.launch import rank_device
from course_lib.distributed.tensor_parallel import (
    gather_full_grads,
    parallelize_block,
    shard_attention,
    shard_mlp,
)
from course_lib.model import Block


def tp_block_worker(rank: int, world_size: int, config: Any, state: dict[str, torch.Tensor],
                    x: torch.Tensor, grad_output: torch.Tensor,
                    modes: tuple[str, ...] = ("hand", "dtensor")) -> dict[str, dict[str, Any]]:
    """Run one tensor-parallel :class:`course_lib.model.Block` forward and backward on each rank.

    A worker for :func:`course_lib.distributed.launch.spawn`: every rank builds the block from
    ``config`` and ``state`` (in ``x``'s dtype, on :func:`~course_lib.distributed.launch.rank_device`), shards it (``"hand"``:
    :func:`~course_lib.distributed.tensor_parallel.shard_attention` and :func:`~course_lib.distributed.tensor_parallel.shard_mlp`; ``"dtensor"``: :func:`~course_lib.distributed.tensor_parallel.parallelize_block`),
    runs ``x`` through it and back-propagates ``grad_output``. Compare what it returns with the unsharded block.

    Returns:
        ``{mode: {"output", "input_grad", "grads" (full, by name), "local_numel"}}`` where
        ``local_numel`` counts the parameter elements this rank stores.
    """
    device = rank_device()
    x, grad_output = x.to(device), grad_output.to(device)
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        block = Block(config).to(device=device, dtype=x.dtype)
        block.load_state_dict(state)
        if mode == "hand":
            shard_attention(block.attn)
            shard_mlp(block.mlp)
        elif mode == "dtensor":
            parallelize_block(block)
        else:
            raise ValueError(f"mode must be 'hand' or 'dtensor', got {mode!r}")
        x_in = x.clone().requires_grad_(True)
        y = block(x_in)
        y.backward(grad_output)
        local_numel = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in block.parameters())
        grads = {name: g.cpu() for name, g in gather_full_grads(block).items()}
        results[mode] = {"output": y.detach().cpu(), "input_grad": x_in.grad.cpu(), "grads": grads,
                         "local_numel": local_numel}
    return results

