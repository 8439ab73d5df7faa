"""FSDP2 (fully_shard) trains exactly like one process, while each rank stores ~1/N of the state."""

from __future__ import annotations

import copy

import pytest
import torch
from nccl_rules import run_checked

from course_lib.distributed import launch, sharding
from course_lib.lessons.sharding import fsdp_train_worker
from course_lib.model import GPT, GPTConfig


def test_bytes_per_rank_of_a_plain_model_counts_everything_once():
    model = GPT(GPTConfig.from_preset("nano", vocab_size=20))
    n = model.num_params()  # tied head counted once
    assert sharding.bytes_per_rank(model) == sharding.RankBytes(params=4 * n, grads=0, optimizer=0)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    optimizer.step()
    used = sharding.bytes_per_rank(model, optimizer)
    n_tensors = len(list(model.parameters()))
    # AdamW: exp_avg and exp_avg_sq per parameter, plus one float32 step counter per tensor
    assert (used.grads, used.optimizer) == (4 * n, 8 * n + 4 * n_tensors)


def test_shard_model_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        sharding.shard_model(GPT(GPTConfig.from_preset("nano", vocab_size=20)))


@pytest.mark.distributed
def test_fsdp2_training_equals_single_process_and_shards_the_state():
    config = GPTConfig.from_preset("nano", vocab_size=48)
    torch.manual_seed(0)
    ref = GPT(config).double()
    state = copy.deepcopy(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (4, 17), generator=g) for _ in range(4)]
    lr = 1e-2

    # the reference: one process, whole batch, plain AdamW
    optimizer = torch.optim.AdamW(ref.parameters(), lr=lr)
    ref_losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = ref(batch[:, :-1], labels=batch[:, 1:]).loss
        loss.backward()
        optimizer.step()
        ref_losses.append(loss.item())
    full = sharding.bytes_per_rank(ref, optimizer)

    world = 2
    results = launch.spawn(run_checked, world, fsdp_train_worker, config, state, batches, lr, timeout_s=120)
    for r in results:
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-6, abs=0)
        assert r["state"].keys() == ref.state_dict().keys()
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(r["state"][name], value, rtol=0, atol=1e-10, msg=name)
        # about 1/N of each kind of state per rank (dim-0 chunks can be uneven by a row)
        for kind in ("params", "grads", "optimizer"):
            share = getattr(r["bytes"], kind) / getattr(full, kind)
            assert abs(share - 1 / world) < 0.03, (kind, share)
    # shards do not overlap: together the ranks hold exactly one copy of the parameters
    assert sum(r["bytes"].params for r in results) == full.params
