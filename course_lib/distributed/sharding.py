"""Sharded data parallelism (ZeRO-3 / FSDP) with PyTorch's FSDP2 ``fully_shard``.

Data parallelism keeps a full copy of the weights, gradients and optimizer state on every rank.
Fully sharded data parallelism keeps only ``1/N`` of each on a rank: every parameter becomes a
DTensor split along dim 0, the forward and backward of a block first **all-gather** its full
weights (and free them after), and the gradients are **reduce-scattered** so each rank ends
with the averaged gradient of its own shard only. The optimizer then updates shards.

``fully_shard`` is applied to each transformer block first (one all-gather per block, so only
one block's full weights exist at a time), then to the root for what is left (embeddings, final
norm, tied head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def _fully_shard() -> Any:
    try:  # torch >= 2.6: public home of FSDP2
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:  # pragma: no cover - depends on the installed torch
        raise ImportError(
            "FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6; upgrade torch"
        ) from err
    return fully_shard


def shard_model(model: nn.Module, mesh: Any = None, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every block of ``model.blocks``, then to ``model`` itself.

    Call it after the process group is up and *before* building the optimizer (the optimizer
    must see the sharded DTensor parameters). Works in place and returns ``model``.

    Args:
        model: a :class:`course_lib.model.GPT` (anything with an iterable ``blocks``).
        mesh: a 1-D ``DeviceMesh`` to shard over; by default all ranks on this rank's device.
        reshard_after_forward: free the gathered weights after each block's forward (ZeRO-3,
            least memory) or keep them until the backward (ZeRO-2 like, one all-gather fewer).
    """
    from course_lib.distributed.launch import is_distributed

    if not is_distributed():
        raise RuntimeError(
            "shard_model needs an initialised process group: run inside "
            "course_lib.distributed.launch.spawn(...) or under torchrun"
        )
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks to shard one by one; pass a course_lib GPT")
    if mesh is None:
        from course_lib.distributed.tensor_parallel import default_mesh

        mesh = default_mesh()
    fully_shard = _fully_shard()
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` stored on this rank: a DTensor's local shard, or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(t: torch.Tensor) -> int:
    local = local_tensor(t)
    return local.numel() * local.element_size()


@dataclass
class RankBytes:
    """Bytes held by one rank, split by what they store."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def bytes_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> RankBytes:
    """Measure the parameter, gradient and optimizer-state bytes stored on this rank.

    Sharded (DTensor) tensors count only their local shard; plain tensors count in full, so the
    same function measures an unsharded model, DDP or FSDP. A tied weight is counted once.
    Gradients count only where ``.grad`` exists (after a backward); optimizer state only after
    the first ``step`` (Adam creates ``exp_avg`` and ``exp_avg_sq`` lazily).
    """
    params = list(model.parameters())  # already de-duplicated (tied weights appear once)
    n_params = sum(_nbytes(p) for p in params)
    n_grads = sum(_nbytes(p.grad) for p in params if p.grad is not None)
    n_opt = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            n_opt += sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return RankBytes(params=n_params, grads=n_grads, optimizer=n_opt)


