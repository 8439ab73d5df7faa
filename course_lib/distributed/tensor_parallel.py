"""Tensor parallelism: split one layer's matrices across ranks (Megatron-LM style).

A linear layer ``y = x W^T + b`` can be split two ways across ``N`` ranks:

* **column parallel**: each rank holds ``1/N`` of the *output* features (rows of ``W``). Every
  rank needs the whole input ``x`` and produces a slice of ``y``.
* **row parallel**: each rank holds ``1/N`` of the *input* features (columns of ``W``). Every
  rank takes a slice of ``x`` and produces a *partial sum* of ``y``; an all-reduce adds them.

Put a column-parallel layer before a row-parallel one (MLP: ``fc_in`` then ``fc_out``;
attention: ``q/k/v`` then ``o_proj``) and the slice produced by the first is exactly the slice
the second wants: one all-reduce per block in the forward pass and one in the backward pass.

The communication must be visible to autograd, so it is wrapped in two tiny functions that are
each other's mirror image (Megatron calls them ``f`` and ``g``):

=====================  =====================  ======================
function               forward                backward
=====================  =====================  ======================
``copy_to_region``     identity               all-reduce (sum)
``reduce_from_region`` all-reduce (sum)       identity
=====================  =====================  ======================

The first part of this module builds all of it by hand from plain ``torch.distributed``
collectives; :func:`parallelize_block` then does the same with PyTorch's DTensor
``parallelize_module`` so the two can be checked against each other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_lib.distributed.launch import is_distributed, rank_device

ProcessGroup = Any  # torch.distributed.ProcessGroup (None means the default group)


def _world_and_rank(group: ProcessGroup | None) -> tuple[int, int]:
    if not is_distributed():
        raise RuntimeError(
            "tensor parallel layers need an initialised process group: run inside "
            "course_lib.distributed.launch.spawn(...) or under torchrun"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def _check_divisible(size: int, world_size: int, what: str) -> int:
    if size % world_size != 0:
        raise ValueError(
            f"{what} = {size} cannot be split evenly over {world_size} ranks; choose a world size "
            f"that divides {size}"
        )
    return size // world_size


# ---------------------------------------------------------------------------------------------
# Communication with the right gradients
# ---------------------------------------------------------------------------------------------


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (Megatron's ``f``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward; identity backward (Megatron's ``g``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_region(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, gradients summed over ranks backward."""
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Leave a tensor-parallel region: partial results summed over ranks, identity backward."""
    return _ReduceFromRegion.apply(x, group)



# ---------------------------------------------------------------------------------------------
# Hand-written parallel linear layers
# ---------------------------------------------------------------------------------------------


def _rank_slice(size: int, group: ProcessGroup | None, what: str) -> slice:
    """This rank's contiguous share ``[rank*k, (rank+1)*k)`` of ``size`` features."""
    world_size, rank = _world_and_rank(group)
    k = _check_divisible(size, world_size, what)
    return slice(rank * k, (rank + 1) * k)


class ColumnParallelLinear(nn.Module):
    """This rank's share of the *output* features of an existing ``nn.Linear``.

    ``weight`` is rows ``[rank*k, (rank+1)*k)`` of the original ``(out, in)`` weight with
    ``k = out // world_size`` (likewise the bias). The input is replicated on every rank; the
    output is this rank's slice of the features (the input a :class:`RowParallelLinear` wants).

    Args:
        linear: the unsharded layer; its values are copied (every rank must pass the same one).
        group: process group to split over (``None``: the default group).
    """

    def __init__(self, linear: nn.Linear, group: ProcessGroup | None = None) -> None:
        super().__init__()
        rows = _rank_slice(linear.out_features, group, "out_features")
        self.group = group
        self.in_features, self.out_features = linear.in_features, rows.stop - rows.start
        self.weight = nn.Parameter(linear.weight.detach()[rows].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach()[rows].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_region(x, self.group), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features(local)={self.out_features}"


class RowParallelLinear(nn.Module):
    """This rank's share of the *input* features of an existing ``nn.Linear``.

    ``weight`` is columns ``[rank*k, (rank+1)*k)`` of the original weight. Each rank computes a
    partial product from its slice of the input features (the output of a
    :class:`ColumnParallelLinear`); an all-reduce sums them, then the (unsplit) bias is added once.

    Args:
        linear: the unsharded layer; its values are copied (every rank must pass the same one).
        group: process group to split over (``None``: the default group).
    """

    def __init__(self, linear: nn.Linear, group: ProcessGroup | None = None) -> None:
        super().__init__()
        cols = _rank_slice(linear.in_features, group, "in_features")
        self.group = group
        self.in_features, self.out_features = cols.stop - cols.start, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach()[:, cols].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_region(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features(local)={self.in_features}, out_features={self.out_features}"


def shard_mlp(mlp: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Split a :class:`course_lib.model.MLP` in place: ``fc_in`` by columns, ``fc_out`` by rows.

    The GELU between them is element-wise, so it runs on each rank's slice unchanged; the block
    costs one all-reduce forward and one backward. Returns ``mlp`` for chaining.
    """
    _require_linears(mlp, ("fc_in", "fc_out"))
    mlp.fc_in = ColumnParallelLinear(mlp.fc_in, group)
    mlp.fc_out = RowParallelLinear(mlp.fc_out, group)
    return mlp


def shard_attention(attn: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Split a :class:`course_lib.model.CausalSelfAttention` in place, whole heads per rank.

    ``q_proj``, ``k_proj`` and ``v_proj`` become column parallel (rank ``r`` keeps heads
    ``[r*h, (r+1)*h)``), ``o_proj`` row parallel. Attention is independent per head, so each rank
    runs the unchanged attention code on its heads (the head count is read from the projection's
    output size). Needs ``n_head`` divisible by the world size. Returns ``attn``.
    """
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    _require_linears(attn, names)
    world_size, _ = _world_and_rank(group)
    n_head = attn.q_proj.out_features // attn.head_dim
    if n_head % world_size != 0:
        raise ValueError(
            f"{n_head} attention heads cannot be split evenly over {world_size} ranks; "
            f"tensor parallelism gives each rank whole heads, so use a world size dividing {n_head}"
        )
    for name in names[:3]:
        setattr(attn, name, ColumnParallelLinear(getattr(attn, name), group))
    attn.o_proj = RowParallelLinear(attn.o_proj, group)
    return attn


def _require_linears(module: nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        layer = getattr(module, name, None)
        if not isinstance(layer, nn.Linear):
            raise TypeError(
                f"{type(module).__name__}.{name} must be an nn.Linear to be sharded, got "
                f"{type(layer).__name__}; shard each module once, before wrapping it (LoRA, DDP, ...)"
            )


# ---------------------------------------------------------------------------------------------
# The same with DTensor
# ---------------------------------------------------------------------------------------------


def block_tp_plan() -> dict[str, Any]:
    """The DTensor plan for one :class:`course_lib.model.Block`: the same split as by hand."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
        "mlp.fc_in": ColwiseParallel(),
        "mlp.fc_out": RowwiseParallel(),
    }


def parallelize_block(block: nn.Module, mesh: Any = None) -> nn.Module:
    """Tensor-parallelise a transformer block with ``torch.distributed.tensor.parallel``.

    ``ColwiseParallel`` / ``RowwiseParallel`` turn the weights into DTensors sharded on dim 0 /
    dim 1 of ``mesh`` and insert the same communication as :func:`shard_mlp` and
    :func:`shard_attention`. Inputs and outputs stay plain (replicated) tensors.

    Args:
        block: a :class:`course_lib.model.Block` (anything with ``attn`` and ``mlp`` like it).
        mesh: a 1-D ``DeviceMesh``; by default one over all ranks on this rank's device type.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    _world_and_rank(None)  # fails clearly when no process group is running
    if mesh is None:
        mesh = default_mesh()
    n_head = block.attn.q_proj.out_features // block.attn.head_dim
    if n_head % mesh.size() != 0:
        raise ValueError(
            f"{n_head} attention heads cannot be split evenly over a mesh of {mesh.size()} ranks; "
            f"use a mesh size dividing {n_head}"
        )
    return parallelize_module(block, mesh, block_tp_plan())


def default_mesh() -> Any:
    """A 1-D ``DeviceMesh`` over every rank, on :func:`rank_device`'s device type."""
    from torch.distributed.device_mesh import init_device_mesh

    world_size, _ = _world_and_rank(None)  # fails clearly when no process group is running
    return init_device_mesh(rank_device().type, (world_size,))


# ---------------------------------------------------------------------------------------------
# Checking a sharded block against the unsharded one
# ---------------------------------------------------------------------------------------------


def _all_gather_cat(t: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    world_size, _ = _world_and_rank(group)
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def gather_full_grads(module: nn.Module, group: ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, reassembled to the unsharded shape, by parameter name.

    Column-parallel weights and biases are gathered along dim 0, row-parallel weights along
    dim 1, DTensor gradients with ``full_tensor()``; replicated gradients are returned as they
    are. The names match the unsharded module's ``named_parameters()``. All ranks must call it.
    """
    grads: dict[str, torch.Tensor] = {}
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if p.grad is None:
                continue
            g = p.grad
            if isinstance(mod, ColumnParallelLinear):
                g = _all_gather_cat(g, 0, group)
            elif isinstance(mod, RowParallelLinear) and p_name == "weight":
                g = _all_gather_cat(g, 1, group)
            elif callable(getattr(g, "full_tensor", None)):
                g = g.full_tensor()
            grads[f"{mod_name}.{p_name}" if mod_name else p_name] = g.detach().clone()
    return grads


