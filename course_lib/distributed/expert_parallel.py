"""Expert parallelism: the experts of an MoE layer spread over ranks, tokens sent to them with all-to-all.

With ``E`` experts on ``N`` ranks, rank ``r`` holds experts ``r*E/N .. (r+1)*E/N - 1`` (and a
replica of the router). Each rank routes its own tokens, then:

1. **exchange split sizes**: every rank tells every other how many rows it will send to each of
   its experts (an ``all_to_all_single`` of ``E`` counts), so receivers can size their buffers;
2. **dispatch**: ``all_to_all_single`` sends each kept token to the rank that owns its expert
   (rows sorted by expert, so each destination's rows are contiguous);
3. each rank runs its experts on the rows it received (grouped by source rank, then expert);
4. **combine**: the reverse ``all_to_all_single`` brings the outputs home, where they are scaled
   by their gates and added to their tokens.

The all-to-all is differentiable (:class:`_AllToAll`: its backward is the all-to-all with the
split sizes swapped), so gradients reach the experts from every rank's tokens. Routing, capacity
and gates are computed as in :class:`course_lib.moe.MoEMLP` on each rank's own tokens, so the
layer equals that module applied to each rank's tokens on one process. The router is replicated:
average its gradients over ranks as DDP does for any replicated weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from course_lib.moe import MoEMLP, expert_ffn, route


class _AllToAll(torch.autograd.Function):
    """Rows ``x`` split by ``in_splits`` go to each rank; ``out_splits`` rows arrive from each."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        ctx.splits = (out_splits, in_splits)
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits)
        return grad_in, None, None


class ExpertParallelMoE(nn.Module):
    """The experts of ``moe`` (identical on every rank) split over the ranks of the default group.

    Attributes:
        sent_rows: rows this rank sent to other ranks in the last forward (dispatch + combine).
    """

    def __init__(self, moe: MoEMLP) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs a process group: run inside launch.spawn(...) or torchrun")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        E, N = moe.n_experts, self.world_size
        if E % N != 0:
            raise ValueError(
                f"n_experts={E} cannot be split evenly over world_size={N} ranks: use a number of experts "
                f"that is a multiple of {N} (e.g. {(E // N + 1) * N}) or a world size that divides {E}"
            )
        self.n_experts, self.k, self.capacity_factor = E, moe.k, moe.capacity_factor
        self.n_local = E // N
        mine = slice(self.rank * self.n_local, (self.rank + 1) * self.n_local)
        self.router = nn.Linear(moe.router.in_features, E, bias=False).to(moe.router.weight)
        self.router.load_state_dict(moe.router.state_dict())
        for name in ("w_in", "b_in", "w_out", "b_out"):
            setattr(self, name, nn.Parameter(getattr(moe, name).detach()[mine].clone()))
        self.aux_loss: torch.Tensor | None = None
        self.sent_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.size(-1))
        r = route(self.router(tokens), self.k, self.capacity_factor)
        self.aux_loss, self.last_routing = r.aux_loss, r
        token = torch.arange(tokens.size(0), device=x.device).unsqueeze(1).expand_as(r.expert)[r.kept]
        expert, gate = r.expert[r.kept], r.gate[r.kept]
        order = torch.argsort(expert, stable=True)  # rows grouped by expert, hence by destination rank
        token, expert, gate = token[order], expert[order], gate[order]

        # 1. split sizes: how many rows each rank sends to each of my experts
        counts = torch.bincount(expert, minlength=self.n_experts)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts)  # E/N counts to each rank, E/N from each
        send_splits = counts.view(self.world_size, self.n_local).sum(dim=1).tolist()
        recv_counts = recv_counts.view(self.world_size, self.n_local)  # [source rank, local expert]
        recv_splits = recv_counts.sum(dim=1).tolist()

        # 2. dispatch, 3. run my experts on what arrived (source by source, expert by expert)
        received = _AllToAll.apply(tokens[token], recv_splits, send_splits)
        outputs = []
        for i, rows in enumerate(received.split(recv_counts.flatten().tolist())):
            j = i % self.n_local
            outputs.append(expert_ffn(rows, self.w_in[j], self.b_in[j], self.w_out[j], self.b_out[j]))
        done = torch.cat(outputs) if outputs else received

        # 4. combine: outputs travel back, are gated and added to their tokens
        back = _AllToAll.apply(done, send_splits, recv_splits)
        self.sent_rows = sum(send_splits) - send_splits[self.rank] + sum(recv_splits) - recv_splits[self.rank]
        return torch.zeros_like(tokens).index_add(0, token, back * gate.unsqueeze(-1)).view_as(x)
