"""Expert parallelism over gloo: outputs and gradients equal the same MoE on one process."""

from __future__ import annotations

import pytest
import torch

from course_lib.distributed import launch
from course_lib.lessons.moe import expert_parallel_worker
from course_lib.moe import MoEMLP


def _reference(moe_args, state, inputs, grad_outputs):
    """One process: the same MoE applied to each rank's tokens (capacity is per rank's batch)."""
    moe = MoEMLP(**moe_args).double()
    moe.load_state_dict(state)
    xs = [x.clone().requires_grad_() for x in inputs]
    outs = [moe(x) for x in xs]
    dropped = []
    for x in xs:
        moe(x)
        dropped.append(moe.last_routing.dropped)
    torch.autograd.backward(outs, grad_outputs)
    return moe, outs, xs, dropped


@pytest.mark.distributed
@pytest.mark.parametrize("world,n_experts,k,cf", [(2, 4, 2, 1.0), (4, 4, 1, 1.25), (4, 8, 2, 0.75)])
def test_expert_parallel_equals_one_process(world, n_experts, k, cf):
    moe_args = dict(d_model=8, d_hidden=16, n_experts=n_experts, k=k, capacity_factor=cf)
    torch.manual_seed(0)
    state = MoEMLP(**moe_args).double().state_dict()
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, 5, 8, dtype=torch.float64, generator=g) for _ in range(world)]
    grad_outputs = [torch.randn(3, 5, 8, dtype=torch.float64, generator=g) for _ in range(world)]
    moe, outs, xs, dropped = _reference(moe_args, state, inputs, grad_outputs)

    results = launch.spawn(expert_parallel_worker, world, moe_args, state, inputs, grad_outputs, timeout_s=120)

    per_rank = n_experts // world
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["out"], outs[rank].detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(r["grad_x"], xs[rank].grad, rtol=0, atol=1e-12)
        # the router is replicated: the mean of its gradients over ranks is the one-process one / world
        torch.testing.assert_close(r["router_grad"] * world, moe.router.weight.grad, rtol=0, atol=1e-12)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        for name, grad in r["expert_grads"].items():
            torch.testing.assert_close(grad, getattr(moe, name).grad[mine], rtol=0, atol=1e-12, msg=name)
        assert r["dropped"] == dropped[rank]
        assert r["sent_rows"] > 0
    if cf < 1:
        assert sum(dropped) > 0


@pytest.mark.distributed
def test_experts_must_divide_over_the_ranks():
    from course_lib.lessons.moe import expert_parallel_worker as worker

    state = MoEMLP(8, 8, n_experts=3).state_dict()
    x = [torch.randn(4, 8)] * 2
    with pytest.raises(launch.WorkerFailed, match="multiple of 2"):
        launch.spawn(worker, 2, dict(d_model=8, d_hidden=8, n_experts=3), state, x, x, timeout_s=60)
