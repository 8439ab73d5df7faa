"""One interface for what differs between a single process, DDP and FSDP2 in the training loop.

The loop in :mod:`course_lib.training` never asks "is this DDP?". It asks a
:class:`Parallelism` (chosen by :func:`parallelism_for` from the model it is given):

=========================  ===============  =========================  ==============================
question                   single process   DDP                        FSDP2 (``fully_shard``)
=========================  ===============  =========================  ==============================
skip the gradient sync     nothing to skip  ``model.no_sync()``         ``set_requires_gradient_sync``
  on all but the last
  micro-step
real tokens of the window  this process's   all-reduced over the group  all-reduced over the mesh
gradient division          1 / tokens       world / global tokens      world / global tokens
                                            (DDP averages gradients)   (FSDP2 averages too)
process group              none             ``model.process_group``    the mesh's group
who writes checkpoints     the process      group rank 0, one file     every rank its shards (DCP)
=========================  ===============  =========================  ==============================

So the gradients after a window equal one process's gradient of the token-weighted mean loss of
the *global* batch, whatever the strategy, and the logged loss is that global mean.

``apply_ddp`` / ``apply_fsdp`` are the torchtitan-style entry points that wrap a model;
``real_tokens`` is the one place that counts the tokens a loss is averaged over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from course_lib.constants import IGNORE_INDEX
from course_lib.distributed.launch import is_distributed

__all__ = ["Parallelism", "SingleProcess", "DataParallel", "FullyShardedDataParallel", "parallelism_for",
           "apply_ddp", "apply_fsdp", "real_tokens", "unwrap"]

def real_tokens(labels: torch.Tensor) -> int:
    """Number of scored positions (``labels != -100``): what a token-weighted loss divides by.

    Count on the host copy of a batch (before it moves to the GPU): reading a GPU count back
    would make the host wait for the device on every micro-batch.
    """
    if labels.device.type == "cpu":  # numpy reads host memory directly: no tensor round trip
        return int(np.count_nonzero(labels.numpy() != IGNORE_INDEX))
    return int((labels != IGNORE_INDEX).sum())  # a device sync: avoid in the training loop


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose ``state_dict`` keys are the model's own: without DDP's ``module.``
    or ``torch.compile``'s ``_orig_mod.`` prefix."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


class Parallelism:
    """A single process: the base case, and the interface every strategy implements.

    Attributes:
        name: ``"single"``, ``"ddp"`` or ``"fsdp"``.
        group: the process group the gradients are synchronised over (``None`` = no group).
        rank: this process's rank in ``group`` (0 when single).
        world_size: processes in ``group`` (1 when single).
        sharded: each rank holds only part of the model and optimizer state (saved with DCP).
        device: where this rank trains.
    """

    name = "single"
    sharded = False

    def __init__(self, device: torch.device, group: Any = None) -> None:
        self.device = torch.device(device)
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world_size = dist.get_world_size(group) if group is not None else 1

    @property
    def is_writer(self) -> bool:
        """The rank that logs and writes the non-sharded checkpoint file (group rank 0)."""
        return self.rank == 0

    # ------------------------------------------------------------------ gradient sync

    @contextlib.contextmanager
    def micro_step(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Run one micro-step's backward; gradients are synchronised only when ``last``."""
        yield

    def loss_scale(self, global_real_tokens: int) -> float:
        """What each micro-batch's *summed* loss is multiplied by before backward.

        ``world_size / global tokens``: the gradient of the global token-weighted mean loss
        after the strategy has averaged the gradients over ``world_size`` ranks.
        """
        return self.world_size / global_real_tokens

    # ------------------------------------------------------------------ collectives

    def window_counts(self, real: int, inputs: int, n_micro: int,
                      data_ends: bool = False) -> tuple[int, int, int, bool]:
        """Global real tokens, global input tokens, the micro-batches of a window, and whether
        the data ends with it, agreed over the group.

        One collective per window (on GPUs its read-back is the one host sync of a step under
        DDP/FSDP2). Ranks that disagree on the window's size or on the data ending raise here,
        before a backward or a step in which they would wait for each other forever.
        """
        if self.group is None:
            return real, inputs, n_micro, data_ends
        mine = torch.tensor([real, inputs, n_micro, int(data_ends)], dtype=torch.int64, device=self._comm_device())
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine, group=self.group)
        counts = torch.stack(every).cpu()
        most, fewest = int(counts[:, 2].max()), int(counts[:, 2].min())
        if most != fewest or int(counts[:, 3].max()) != int(counts[:, 3].min()):
            raise RuntimeError(
                f"ranks disagree on the window size ({fewest} to {most} micro-batches) or on where the data "
                "ends: every rank must get the same number of batches (use a DistributedSampler / equal shards)"
            )
        return int(counts[:, 0].sum()), int(counts[:, 1].sum()), n_micro, data_ends

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the group (a copy; unchanged when single)."""
        if self.group is None:
            return value
        value = value.clone()
        dist.all_reduce(value, group=self.group)
        return value

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank (``[obj]`` when single)."""
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Group rank 0's ``obj`` on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def _comm_device(self) -> torch.device:
        backend = dist.get_backend(self.group) if self.group is not None else "gloo"
        return self.device if backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ gradients and state

    def clip_grad_norm(self, params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to ``max_norm``; return the norm before clipping
        (a tensor on the device: reading it is a host sync, done only on logged steps)."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """The model's state dict as the checkpoint stores it (no wrapper prefixes)."""
        return unwrap(model).state_dict()

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        unwrap(model).load_state_dict(state)


class SingleProcess(Parallelism):
    """One process (possibly inside a process group it does not train with)."""


class DataParallel(Parallelism):
    """``DistributedDataParallel``: a full replica per rank, gradients all-reduced (averaged)."""

    name = "ddp"

    def __init__(self, model: DistributedDataParallel, device: torch.device) -> None:
        if not is_distributed():
            raise ValueError("the model is wrapped in DistributedDataParallel but no process group is initialised")
        group = getattr(model, "process_group", None) or dist.group.WORLD
        super().__init__(device, group)

    @contextlib.contextmanager
    def micro_step(self, model: nn.Module, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else model.no_sync():
            yield


class FullyShardedDataParallel(Parallelism):
    """FSDP2 (``fully_shard``): each rank holds shards; gradients reduce-scattered (averaged).

    FSDP2 divides the reduce-scattered gradient by the number of ranks, like DDP, so the loss
    factor is the same ``world / global tokens``. The checkpoint is sharded: every rank writes
    its own shards with ``torch.distributed.checkpoint`` (:mod:`course_lib.train_state`).
    """

    name = "fsdp"
    sharded = True

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        if not is_distributed():
            raise ValueError("the model is sharded with fully_shard but no process group is initialised")
        mesh = next(p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh"))
        super().__init__(device, mesh.get_group())

    @contextlib.contextmanager
    def micro_step(self, model: nn.Module, last: bool) -> Iterator[None]:
        model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model)

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state)


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def parallelism_for(model: nn.Module, device: torch.device | str) -> Parallelism:
    """The strategy a model was wrapped with: DDP, FSDP2 (``fully_shard``) or a single process."""
    device = torch.device(device)
    if isinstance(model, DistributedDataParallel):
        return DataParallel(model, device)
    if _is_fsdp(model):
        return FullyShardedDataParallel(model, device)
    return SingleProcess(device)


def apply_ddp(model: nn.Module, device: torch.device | None = None, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Wrap ``model`` in DDP on this rank's device (rank 0's weights are broadcast to all)."""
    from course_lib.distributed.data_parallel import wrap_ddp

    return wrap_ddp(model, device, **ddp_kwargs)


def apply_fsdp(model: nn.Module, mesh: Any = None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard every block, then the root, with FSDP2 ``fully_shard`` (in place; returns ``model``).

    Call after the process group is up and before the optimizer is built. Every rank must start
    from the same weights (seed before building the model: FSDP2 does not broadcast them).
    """
    from course_lib.distributed.sharding import shard_model

    return shard_model(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def apply_tp(model: nn.Module, mesh: Any = None) -> nn.Module:
    """Tensor-parallelise every block of a GPT over ``mesh`` (in place; returns ``model``).

    Each block's q/k/v and first MLP layer are split by columns and o_proj and the second MLP
    layer by rows (``torch.distributed.tensor.parallel``, Megatron's layout: one all-reduce after
    attention and one after the MLP). Embeddings, norms and the tied head stay replicated. Every
    rank must start from the same weights.
    """
    from course_lib.distributed.tensor_parallel import parallelize_block

    for block in model.blocks:
        parallelize_block(block, mesh)
    return model


def build_pipeline(model: nn.Module, stage: int | None = None, n_stages: int | None = None) -> nn.Module:
    """This rank's pipeline stage of a GPT: its share of the blocks (rank = stage by default).

    The stages come from :func:`course_lib.distributed.pipeline.partition_layers` (uneven layer
    counts handled); run them with :func:`course_lib.distributed.pipeline.run_schedule`.
    """
    from course_lib.distributed.launch import get_rank, get_world_size
    from course_lib.distributed.pipeline import build_stage

    n_stages = get_world_size() if n_stages is None else n_stages
    stage = get_rank() if stage is None else stage
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} does not exist in a pipeline of {n_stages} stages")
    return build_stage(model, stage, n_stages)
