"""Tensor parallelism, by hand and with DTensor, against the unsharded block (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from nccl_rules import run_checked

from course_lib.distributed import launch
from course_lib.distributed import tensor_parallel as tp
from course_lib.lessons.tensor_parallel import tp_block_worker
from course_lib.model import Block, GPTConfig

CONFIG = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=4, n_embd=32)


@pytest.fixture
def fake_group():
    """A single-process group that pretends to have 3 ranks (collectives do nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=3)
    yield
    dist.destroy_process_group()


def test_layers_need_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        tp.ColumnParallelLinear(torch.nn.Linear(4, 4))


def test_uneven_splits_are_refused_with_the_fix(fake_group):
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        tp.ColumnParallelLinear(torch.nn.Linear(4, 8))
    with pytest.raises(ValueError, match="4 attention heads cannot be split evenly over 3"):
        tp.shard_attention(Block(CONFIG).attn)
    with pytest.raises(ValueError, match="4 attention heads cannot be split evenly over a mesh of 3"):
        tp.parallelize_block(Block(CONFIG))
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        mlp = Block(CONFIG).mlp
        mlp.fc_in = torch.nn.Identity()
        tp.shard_mlp(mlp)


def test_shards_hold_the_right_slices(fake_group):
    """Rank 0 of 3: column shard = first third of the rows, row shard = first third of columns."""
    linear = torch.nn.Linear(6, 9)
    col = tp.ColumnParallelLinear(linear)
    row = tp.RowParallelLinear(torch.nn.Linear(9, 6))
    assert torch.equal(col.weight, linear.weight[:3]) and torch.equal(col.bias, linear.bias[:3])
    assert row.weight.shape == (6, 3) and row.bias.shape == (6,)


@pytest.mark.distributed
def test_sharded_block_matches_unsharded_outputs_and_gradients():
    torch.manual_seed(0)
    ref = Block(CONFIG).double()
    state = copy.deepcopy(ref.state_dict())
    x = torch.randn(2, 8, CONFIG.n_embd, dtype=torch.float64)
    grad_out = torch.randn(2, 8, CONFIG.n_embd, dtype=torch.float64)

    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    y_ref.backward(grad_out)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    # split: every projection weight, and the biases of the column-parallel q/k/v/fc_in
    split = ("proj.weight", "fc_in.weight", "fc_out.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias", "fc_in.bias")
    n_split = sum(p.numel() for n, p in ref.named_parameters() if n.endswith(split))
    n_replicated = sum(p.numel() for p in ref.parameters()) - n_split

    world = 2
    results = launch.spawn(run_checked, world, tp_block_worker, CONFIG, state, x, grad_out, timeout_s=120)
    for rank, by_mode in enumerate(results):
        for mode in ("hand", "dtensor"):
            r = by_mode[mode]
            torch.testing.assert_close(r["output"], y_ref.detach(), rtol=0, atol=1e-12)
            torch.testing.assert_close(r["input_grad"], x_ref.grad, rtol=0, atol=1e-12)
            assert r["grads"].keys() == ref_grads.keys(), (mode, rank)
            for name, g in r["grads"].items():
                torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-12, msg=f"{mode} {name}")
            # each rank really stores only its half of the split matrices
            assert r["local_numel"] == n_replicated + n_split // world, (mode, rank)
