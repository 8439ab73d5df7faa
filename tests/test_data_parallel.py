"""DDP equals one process on the full batch: gradients, accumulation with no_sync, logged loss."""

from __future__ import annotations

import pytest
import torch
from nccl_rules import run_checked

from course_lib.distributed import data_parallel as dp
from course_lib.distributed.launch import spawn
from course_lib.lessons import data_parallel as workers
from course_lib.model import GPT, IGNORE_INDEX, GPTConfig
from course_lib.training import TrainConfig, train

CONFIG = GPTConfig.from_preset("nano", vocab_size=50)
ROWS, SEQ = 8, 16  # 8 rows split over 2 or 4 ranks, and again into 2 micro-batches


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG.vocab_size, (ROWS, SEQ), generator=g)
    labels = torch.randint(0, CONFIG.vocab_size, (ROWS, SEQ), generator=g)
    # rows hold different numbers of real tokens: a per-rank mean would weight them wrongly
    for row in range(ROWS):
        labels[row, SEQ - 2 * row:] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return GPT(CONFIG).state_dict()


def _reference_grads(state, batch):
    model = GPT(CONFIG)
    model.load_state_dict(state)
    loss = model(batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _own_batch(rank: int) -> dict[str, torch.Tensor]:
    """A different batch per rank, with a different number of real tokens on each."""
    batch = _batch(100 + rank)
    batch["labels"][:, : 3 * rank] = IGNORE_INDEX
    return batch


def _plain_model_grads(state, batch) -> dict[str, torch.Tensor]:
    """A model NOT wrapped in DDP, accumulating inside a process group: it trains on its own."""
    from course_lib.training import accumulate_gradients

    model = GPT(CONFIG)
    model.load_state_dict(state)
    accumulate_gradients(model, dp.split_micro(batch, 2))
    return {n: p.grad for n, p in model.named_parameters()}


def _all_checks(rank: int, world_size: int, state, batch, batches, train_config) -> dict:
    """Everything the test checks, in one process group (starting processes is the slow part)."""
    return {
        "plain": workers.ddp_gradients_worker(rank, world_size, CONFIG, state, batch, grad_accum=1),
        "accum": workers.ddp_gradients_worker(rank, world_size, CONFIG, state, batch, grad_accum=2),
        "train": workers.ddp_train_worker(rank, world_size, CONFIG, state, batches, train_config),
        "sampler": workers.sampler_worker(rank, world_size, 10, 2),
        "no_set_epoch": workers.sampler_worker(rank, world_size, 10, 2, call_set_epoch=False),
        "timing": workers.comm_timing_worker(rank, world_size, CONFIG, state, batch, steps=2),
        "not_ddp": _plain_model_grads(state, _own_batch(rank)),
    }


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_matches_one_process_on_the_full_batch(world_size):
    state, batch = _state(), _batch(1)
    batches = [_batch(10 + i) for i in range(4)]
    train_config = TrainConfig(steps=2, grad_accum=2, lr=1e-2, progress=False)
    out = spawn(run_checked, world_size, _all_checks, state, batch, batches, train_config, timeout_s=150)

    ref_loss, ref_grads = _reference_grads(state, batch)
    for rank, result in enumerate(out):
        for key in ("plain", "accum"):
            r = result[key]
            assert r["grads"].keys() == ref_grads.keys()
            for name, g in ref_grads.items():
                torch.testing.assert_close(r["grads"][name], g, atol=1e-6, rtol=0,
                                           msg=f"{key} rank {rank} {name}")
            assert r["global_loss"] == pytest.approx(ref_loss, abs=1e-6)
            assert r["global_mean_of_local"] == pytest.approx(ref_loss, abs=1e-6)
        # no_sync: the two-micro-batch window all-reduces as often as the one-batch window
        assert result["accum"]["allreduce_calls"] == result["plain"]["allreduce_calls"] >= 1
    # without DDP nothing is all-reduced or rescaled: each rank's gradient is its own batch's
    for rank, result in enumerate(out):
        _, own = _reference_grads(state, _own_batch(rank))
        for name, g in own.items():
            torch.testing.assert_close(result["not_ddp"][name], g, atol=1e-6, rtol=0, msg=f"rank {rank} {name}")
    # rank 0's own loss is one shard's loss, not the batch's: the tutorial's printed number
    assert abs(out[0]["plain"]["local_loss"] - ref_loss) > 1e-4

    n_params = GPT(CONFIG).num_params()
    for result in out:  # the comm hook saw every fp32 gradient once per step, and took time
        timing = result["timing"]
        assert timing.allreduce_bytes == 4 * n_params and timing.world_size == world_size
        assert 0 < timing.comm_share < 1 and timing.compute_s > 0 and timing.exposed_comm_s >= 0
    # the real DataLoader + DistributedSampler reads what rank_indices predicts, epoch by epoch
    for epoch in range(2):
        assert [r["sampler"][epoch] for r in out] == dp.rank_indices(10, world_size, epoch)
        assert [r["no_set_epoch"][epoch] for r in out] == dp.rank_indices(10, world_size, 0)

    model = GPT(CONFIG)
    model.load_state_dict(state)
    single = train(model, batches, train_config)
    for result in out:
        assert result["train"]["losses"] == pytest.approx(single.values("loss"), abs=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(result["train"]["params"][name], p.detach(), atol=2e-5, rtol=0)


def test_rank_indices_cover_the_data_once_and_reshuffle_per_epoch():
    shards = dp.rank_indices(12, 3, epoch=0, seed=5)
    assert sorted(i for s in shards for i in s) == list(range(12))
    assert all(len(s) == 4 for s in shards)
    assert shards == dp.rank_indices(12, 3, epoch=0, seed=5)
    assert shards != dp.rank_indices(12, 3, epoch=1, seed=5)  # set_epoch changes the order
    uneven = dp.rank_indices(10, 4, shuffle=False)
    assert [len(s) for s in uneven] == [3, 3, 3, 3]  # 2 samples repeated to even the ranks out
    assert set(i for s in uneven for i in s) == set(range(10))
    assert [len(s) for s in dp.rank_indices(10, 4, drop_last=True)] == [2, 2, 2, 2]


def test_batch_helpers_and_single_process_global_mean():
    batch = _batch(0)
    shards = [dp.shard_batch(batch, r, 4) for r in range(4)]
    torch.testing.assert_close(torch.cat([s["input_ids"] for s in shards]), batch["input_ids"])
    assert len(dp.split_micro(batch, 2)) == 2
    with pytest.raises(ValueError, match="evenly"):
        dp.shard_batch(batch, 0, 3)
    with pytest.raises(ValueError, match="micro-batches"):
        dp.split_micro(batch, 3)
    assert dp.global_mean(6.0, 4) == 1.5
    with pytest.raises(RuntimeError, match="spawn"):
        dp.wrap_ddp(GPT(CONFIG))


def test_world_larger_than_the_data_is_refused_with_a_fix():
    from course_lib.distributed.data_parallel import rank_indices

    with pytest.raises(ValueError, match="fewer than world_size=4.*fewer processes or more data"):
        rank_indices(3, 4)
    assert [len(r) for r in rank_indices(4, 4)] == [1, 1, 1, 1]
