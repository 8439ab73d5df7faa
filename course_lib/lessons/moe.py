"""Workers and experiments for lesson 16 (mixture of experts) and its tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from course_lib.distributed.expert_parallel import ExpertParallelMoE
from course_lib.distributed.launch import rank_device
from course_lib.moe import MoEMLP


def expert_parallel_worker(rank: int, world_size: int, moe_args: dict[str, Any], state: dict[str, torch.Tensor],
                           inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor]) -> dict[str, Any]:
    """Run :class:`ExpertParallelMoE` on this rank's ``inputs[rank]``; backward with ``grad_outputs[rank]``.

    Returns this rank's output, the gradients of its input and of its experts' weights, the router
    gradient averaged over ranks (as DDP would), and the rows it sent to other ranks.
    """
    device = rank_device()
    moe = MoEMLP(**moe_args).to(device=device, dtype=next(iter(state.values())).dtype)
    moe.load_state_dict(state)
    layer = ExpertParallelMoE(moe)
    x = inputs[rank].to(device).clone().requires_grad_()
    out = layer(x)
    out.backward(grad_outputs[rank].to(device))
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    return {"out": out.detach(), "grad_x": x.grad, "router_grad": router_grad / world_size,
            "expert_grads": {n: getattr(layer, n).grad for n in ("w_in", "b_in", "w_out", "b_out")},
            "sent_rows": layer.sent_rows, "dropped": layer.last_routing.dropped}


def teacher_task(d_model: int, n_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the targets of a random two-layer teacher network (a regression task).

    The inputs share a common direction (mean ``2`` along a random unit vector), as transformer
    hidden states do: that is what lets a bias-free router send every token to one expert.
    """
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d_model, generator=g)
    x = torch.randn(n_tokens, d_model, generator=g) + 2 * direction / direction.norm()
    w1, w2 = torch.randn(d_model, 4 * d_model, generator=g), torch.randn(4 * d_model, d_model, generator=g)
    y = torch.tanh(x @ w1 / d_model**0.5) @ w2 / (4 * d_model) ** 0.5
    return x, y


def train_router_usage(seed: int, aux_coef: float, steps: int = 100, n_experts: int = 4, d_model: int = 16,
                       d_hidden: int = 32, batch: int = 128, lr: float = 1e-2) -> torch.Tensor:
    """Train a top-1 MoE on :func:`teacher_task`; return each step's share of tokens per expert.

    Capacity is unlimited (``capacity_factor = n_experts``) so that nothing hides the router's
    preference. Returns a ``(steps, n_experts)`` tensor of usage fractions (rows sum to 1).
    """
    torch.manual_seed(seed)
    moe = MoEMLP(d_model, d_hidden, n_experts, k=1, capacity_factor=float(n_experts))
    x, y = teacher_task(d_model, batch * 8, seed)
    optimizer = torch.optim.Adam(moe.parameters(), lr=lr)
    usage = []
    for step in range(steps):
        rows = slice((step % 8) * batch, (step % 8 + 1) * batch)
        loss = (moe(x[rows]) - y[rows]).pow(2).mean() + aux_coef * moe.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        usage.append(moe.last_routing.tokens_per_expert.float() / batch)
    return torch.stack(usage)
