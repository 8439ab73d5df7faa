"""ZeRO stages 1, 2 and 3 by hand, on one flat parameter buffer.

Data parallelism (DDP) keeps on every rank a full copy of the parameters, the gradients and the
optimizer state. ZeRO (Rajbhandari et al., 2020) removes the redundancy in three stages:

* **stage 1** shards the optimizer state: the averaged gradient is *reduce-scattered*, so each
  rank receives the mean gradient of its own ``1/N`` slice only, updates that slice with AdamW,
  and an *all-gather* hands every rank the full updated parameters again;
* **stage 2** also shards the gradients: after the reduce-scatter the full gradient is freed and
  only the slice is kept (real ZeRO-2 reduce-scatters bucket by bucket during the backward pass,
  so the full gradient never exists at once; here it exists for a moment at the end of it);
* **stage 3** also shards the parameters: each rank stores only its slice, the full parameters are
  all-gathered right before the forward and freed after it, all-gathered again for the backward
  (saved-tensor hooks, :class:`_GatherParams`), and the gradient is reduce-scattered.

All parameters of the model live in one flat buffer, padded with zeros to a multiple of the world
size ``N`` so that it splits into ``N`` equal slices (the last rank's slice ends in up to ``N - 1``
padding elements; they have zero gradient and zero value, so AdamW with weight decay keeps them
zero). The model runs on views of that buffer through :func:`torch.func.functional_call`.

Because AdamW is element-wise, updating slices equals updating the whole: every stage's parameters
equal DDP's after every step. Real implementations (DeepSpeed, FSDP) do this per block, so that
only one block's parameters are ever gathered; :func:`course_lib.distributed.sharding.shard_model`
is that, with FSDP2. Communication per step and rank with the ring algorithm, for ``B`` bytes of
(padded) parameters: all-reduce ``2 (N-1)/N B`` (DDP), reduce-scatter ``(N-1)/N B`` plus
all-gather ``(N-1)/N B`` (stages 1 and 2: the same as DDP), one more all-gather (stage 3: 3x).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call

from course_lib.distributed.sharding import RankBytes

# Bytes each rank sends per byte of the collective's full tensor, with the ring algorithm.
_RING_FACTOR = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1}


@dataclass
class CommLog:
    """Every collective a :class:`ZeRO` issued: ``(name, bytes of the full tensor)``."""

    calls: list[tuple[str, int]] = field(default_factory=list)

    def bytes(self, name: str | None = None) -> int:
        """Bytes handed to collectives (the full, unsharded tensor's size), of one kind or all."""
        return sum(n for op, n in self.calls if name is None or op == name)

    def ring_bytes_sent(self, world_size: int) -> float:
        """Bytes each rank sends with the ring algorithm: ``(N-1)/N`` per pass over the tensor."""
        return sum(_RING_FACTOR[op] * n * (world_size - 1) / world_size for op, n in self.calls)


def ring_bytes_per_step(param_bytes: int, world_size: int, stage: int) -> float:
    """Bytes each rank sends per step: DDP (``stage=0``) and ZeRO-1/2 ``2 (N-1)/N B``, ZeRO-3 ``3 (N-1)/N B``."""
    passes = 3 if stage == 3 else 2
    return passes * (world_size - 1) / world_size * param_bytes


def expected_bytes(n_params: int, world_size: int, stage: int, param_bytes: int = 4, grad_bytes: int = 4,
                   optimizer_bytes: int = 8) -> RankBytes:
    """Bytes per rank for ``n_params`` parameters: each stage divides one more term by ``N``.

    The defaults are what this module runs in float32 (4 + 4 + 8 bytes: parameters, gradients,
    AdamW's two moments); mixed-precision training is ``param_bytes=2, grad_bytes=2,
    optimizer_bytes=12`` (fp32 master copy + two moments), the 16 bytes/parameter of the ZeRO
    paper. ``stage=0`` is DDP. Sizes are rounded up to ``N`` equal slices as :class:`ZeRO` pads.
    """
    shard = math.ceil(n_params / world_size)
    full = n_params if stage == 0 else shard * world_size
    return RankBytes(
        params=param_bytes * (shard if stage >= 3 else full),
        grads=grad_bytes * (shard if stage >= 2 else full),
        optimizer=optimizer_bytes * (shard if stage >= 1 else full),
    )


@contextmanager
def _quiet() -> Iterator[None]:
    """torch 2.13 deprecates the names of the two collectives (new: ``*_single``); 2.11 has only these."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


class _GatherParams(torch.autograd.Function):
    """Forward: all-gather the parameter slices into the full buffer. Backward: reduce-scatter."""

    @staticmethod
    def forward(ctx: Any, shard: torch.Tensor, zero: ZeRO) -> torch.Tensor:
        ctx.zero = zero
        return zero._all_gather(shard)

    @staticmethod
    def backward(ctx: Any, grad_full: torch.Tensor) -> tuple[torch.Tensor, None]:
        zero = ctx.zero
        zero._regathered = None  # the backward is past every use of the parameters: free them
        return zero._reduce_scatter(grad_full), None


class ZeRO:
    """Train ``module`` with ZeRO ``stage`` (1, 2 or 3) and AdamW, over the default process group.

    Usage on every rank (each with its own slice of the batch)::

        zero = ZeRO(model, stage=3, lr=1e-3, weight_decay=0.1)
        loss = loss_fn(zero(inputs), targets)
        loss.backward()
        zero.step()          # reduce-scatter, update this rank's slice, all-gather (stages 1, 2)

    Args:
        module: the model; its current parameters are the starting point (equal on every rank).
        stage: 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters).
        reshard_after_forward: stage 3 only: free the gathered parameters after the forward and
            gather them again for the backward (ZeRO-3, FSDP's default), or keep them until the
            backward (one all-gather fewer, more memory; FSDP's ``reshard_after_forward=False``).
        **adamw: arguments of :class:`torch.optim.AdamW` (``lr``, ``betas``, ``weight_decay``...).
    """

    def __init__(self, module: nn.Module, stage: int, reshard_after_forward: bool = True, **adamw: Any) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
        if not dist.is_initialized():
            raise RuntimeError("ZeRO needs an initialised process group: run inside launch.spawn(...) or torchrun")
        self.module, self.stage, self.reshard_after_forward = module, stage, reshard_after_forward
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        named = list(module.named_parameters())  # tied weights appear once
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.n_params = sum(self.numels)
        self.shard_numel = math.ceil(self.n_params / self.world_size)
        flat = torch.zeros(self.shard_numel * self.world_size, dtype=named[0][1].dtype, device=named[0][1].device)
        torch.cat([p.detach().flatten() for _, p in named], out=flat[: self.n_params])
        mine = slice(self.rank * self.shard_numel, (self.rank + 1) * self.shard_numel)
        if stage < 3:
            self.flat: torch.Tensor | None = flat.requires_grad_()  # full parameters on every rank
            self.shard = nn.Parameter(flat.detach()[mine])  # a view: updating it updates flat
        else:
            self.flat = None  # nothing full is kept between steps
            self.shard = nn.Parameter(flat[mine].clone())
        self.optimizer = torch.optim.AdamW([self.shard], **adamw)
        self.comm = CommLog()
        self._regathered: torch.Tensor | None = None
        self._gathered_ptr: int | None = None
        self._gathered: list[weakref.ref[torch.Tensor]] = []  # every full buffer all-gathered, while alive
        # the module's own parameters are replaced by views of the flat buffer: free them
        for p in module.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    # -- collectives, counted ---------------------------------------------------------------
    def _all_gather(self, shard: torch.Tensor) -> torch.Tensor:
        full = torch.empty(self.shard_numel * self.world_size, dtype=shard.dtype, device=shard.device)
        with _quiet():
            dist.all_gather_into_tensor(full, shard.detach().contiguous())
        self.comm.calls.append(("all_gather", full.numel() * full.element_size()))
        self._gathered = [ref for ref in self._gathered if ref() is not None] + [weakref.ref(full)]
        return full

    def _reduce_scatter(self, full: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of ``full``'s slice that belongs to this rank."""
        out = torch.empty(self.shard_numel, dtype=full.dtype, device=full.device)
        with _quiet():
            dist.reduce_scatter_tensor(out, full.contiguous())
        self.comm.calls.append(("reduce_scatter", full.numel() * full.element_size()))
        return out.div_(self.world_size)

    # -- forward ----------------------------------------------------------------------------
    def _views(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name, shape, n in zip(self.names, self.shapes, self.numels, strict=True):
            views[name] = full[offset : offset + n].view(shape)
            offset += n
        return views

    def _pack(self, t: torch.Tensor) -> Any:
        """Saved-tensor hook: save a gathered parameter as its position, not its memory."""
        if t.device.type != "meta" and t.untyped_storage().data_ptr() == self._gathered_ptr:
            return ("param", t.storage_offset(), t.size(), t.stride())
        return t

    def _unpack(self, saved: Any) -> torch.Tensor:
        """Saved-tensor hook: gather the parameters again (once per backward) and view into them."""
        if not isinstance(saved, tuple):
            return saved
        if self._regathered is None:
            self._regathered = self._all_gather(self.shard)
        _, offset, size, stride = saved
        return self._regathered.as_strided(size, stride, offset)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module's forward on the full parameters (gathered first at stage 3)."""
        self._zero_grad()
        if self.stage < 3:
            return functional_call(self.module, self._views(self.flat), args, kwargs)
        full = _GatherParams.apply(self.shard, self)
        if not self.reshard_after_forward:  # the autograd graph keeps `full` alive until the backward
            return functional_call(self.module, self._views(full), args, kwargs)
        self._gathered_ptr = full.untyped_storage().data_ptr()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                return functional_call(self.module, self._views(full), args, kwargs)
        finally:
            self._gathered_ptr = None  # `full` is freed as soon as this frame returns

    def _zero_grad(self) -> None:
        """Gradients live from the backward to the next forward; autograd must not add to old ones."""
        if self.stage == 1 and self.flat is not None and self.flat.grad is not None:
            self.flat.grad.zero_()  # stage 1 keeps its full gradient buffer
        self.shard.grad = None

    # -- step -------------------------------------------------------------------------------
    def step(self) -> None:
        """After ``loss.backward()``: average the gradient slices, update, share the parameters."""
        if self.stage < 3:
            assert self.flat is not None
            if self.flat.grad is None:
                raise RuntimeError("call loss.backward() before ZeRO.step()")
            mean = self._reduce_scatter(self.flat.grad)
            if self.stage == 1:  # the slice's mean goes back into the full buffer, which stays
                mine = self.flat.grad[self.rank * self.shard_numel : (self.rank + 1) * self.shard_numel]
                self.shard.grad = mine.copy_(mean)
            else:  # stage 2 keeps only its slice of the gradient
                self.shard.grad, self.flat.grad = mean, None
        elif self.shard.grad is None:
            raise RuntimeError("call loss.backward() before ZeRO.step()")
        self.optimizer.step()
        if self.stage < 3:
            assert self.flat is not None
            self.flat.data.copy_(self._all_gather(self.shard))

    # -- inspection -------------------------------------------------------------------------
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter, full size (gathered at stage 3; not counted in :attr:`comm`)."""
        if self.flat is not None:
            full = self.flat.detach()
        else:
            full = torch.empty(self.shard_numel * self.world_size, dtype=self.shard.dtype, device=self.shard.device)
            with _quiet():
                dist.all_gather_into_tensor(full, self.shard.detach())
        return {k: v.clone() for k, v in self._views(full).items()}

    @property
    def gathered_bytes(self) -> int:
        """Bytes of all-gathered full parameter buffers alive right now (not counting stage 1/2's own).

        At stage 3 with ``reshard_after_forward`` it is 0 between the forward and the backward;
        without it, the full parameters stay alive (held by the autograd graph) until the backward.
        """
        return sum(t.numel() * t.element_size() for ref in self._gathered if (t := ref()) is not None)

    def _held(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.flat is not None:
            yield "params", self.flat
            if self.flat.grad is not None:
                yield "grads", self.flat.grad
        else:
            yield "params", self.shard
        if self.shard.grad is not None and self.stage > 1:  # at stage 1 a view of the full gradient
            yield "grads", self.shard.grad
        for state in self.optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                yield "optimizer", state[key]

    def bytes_per_rank(self) -> RankBytes:
        """Bytes this rank holds after :meth:`step`: parameters, gradients, AdamW's two moments.

        Measured from the tensors themselves (views of the full buffers are not counted twice);
        AdamW's 4-byte step counter is left out. At stage 3 the gathered full parameters exist
        only during the forward and the backward and are not counted.
        """
        held = {"params": 0, "grads": 0, "optimizer": 0}
        for kind, t in self._held():
            held[kind] += t.numel() * t.element_size()
        return RankBytes(**held)
