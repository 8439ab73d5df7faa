"""ZeRO stages 1-3 by hand take DDP's (and one process's) steps, hold 1/N of what they shard, and
communicate what the ring formulas say; FSDP2 and ZeroRedundancyOptimizer take the same steps."""

from __future__ import annotations

import pytest
import torch

from course_lib.distributed import launch
from course_lib.distributed.sharding import RankBytes
from course_lib.distributed.zero import ZeRO, expected_bytes, ring_bytes_per_step
from course_lib.lessons import zero as lessons
from course_lib.model import GPT, GPTConfig

F64 = 8  # bytes per float64 element: the tests run in float64


def test_expected_bytes_divides_one_more_term_per_stage():
    # 16 bytes/param mixed precision (2 + 2 + 12), 4 ranks, 1000 parameters
    mixed = dict(param_bytes=2, grad_bytes=2, optimizer_bytes=12)
    assert expected_bytes(1000, 4, 0, **mixed) == RankBytes(2000, 2000, 12000)
    assert expected_bytes(1000, 4, 1, **mixed) == RankBytes(2000, 2000, 3000)
    assert expected_bytes(1000, 4, 2, **mixed) == RankBytes(2000, 500, 3000)
    assert expected_bytes(1000, 4, 3, **mixed) == RankBytes(500, 500, 3000)
    # uneven: 10 parameters over 3 ranks are padded to 12, slices of 4
    assert expected_bytes(10, 3, 3) == RankBytes(16, 16, 32)
    assert expected_bytes(10, 3, 1).params == 4 * 12


def test_ring_formulas():
    assert ring_bytes_per_step(1200, 4, stage=0) == 2 * 3 / 4 * 1200  # DDP all-reduce
    assert ring_bytes_per_step(1200, 4, stage=2) == ring_bytes_per_step(1200, 4, stage=0)
    assert ring_bytes_per_step(1200, 4, stage=3) == 3 * 3 / 4 * 1200


def test_zero_needs_a_process_group_and_a_valid_stage():
    model = GPT(GPTConfig.from_preset("nano", vocab_size=20))
    with pytest.raises(ValueError, match="stage"):
        ZeRO(model, stage=4)
    with pytest.raises(RuntimeError, match="process group"):
        ZeRO(model, stage=1)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_every_stage_takes_the_single_process_step(world):
    # vocab 38: 27,200 parameters, not a multiple of 3, so world 3 pads the flat buffer
    config = GPTConfig.from_preset("nano", vocab_size=38, block_size=16)
    torch.manual_seed(0)
    state = GPT(config).double().state_dict()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (2 * world, 17), generator=g) for _ in range(3)]
    reference = lessons.single_process_params(config, state, batches)
    n = reference[0].numel()
    padded = -(-n // world) * world
    assert (padded != n) == (world == 3)

    results = launch.spawn(lessons.zero_variants_worker, world, config, state, batches, timeout_s=300)

    for rank, by_variant in enumerate(results):
        for variant, r in by_variant.items():
            for step, (got, want) in enumerate(zip(r["params"], reference, strict=True)):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"{variant} rank {rank} step {step}")
        # bytes held per rank: exactly the formula (padded slices), 8 + 8 + 16 bytes/param in float64
        for stage, variant in enumerate(("ddp", "zero1", "zero2", "zero3")):
            held = by_variant[variant]["bytes"]
            want = expected_bytes(n, world, stage, F64, F64, 2 * F64)
            if variant == "ddp":  # torch's AdamW also keeps a 4-byte step counter per tensor
                held = RankBytes(held.params, held.grads, held.optimizer - 4 * len(state) + 4)
            assert held == want, (variant, held, want)
        assert by_variant["zero3_keep"]["bytes"] == by_variant["zero3"]["bytes"]
        # FSDP2 shards each tensor along dim 0 (uneven rows), about 1/N of everything
        fsdp = by_variant["fsdp2"]["bytes"]
        assert abs(fsdp.params / (F64 * n) - 1 / world) < 0.03
        # ZeroRedundancyOptimizer: full params and grads, ~1/N of the optimizer state (whole tensors)
        zro = by_variant["zero_redundancy"]["bytes"]
        assert (zro.params, zro.grads) == (F64 * n, F64 * n)
        assert abs(zro.optimizer / (2 * F64 * n) - 1 / world) < 0.1

        # communication per step: bytes handed to each collective, then the ring formulas
        B = F64 * padded
        for step in range(len(batches)):
            comm = {v: by_variant[v]["comm"][step] for v in by_variant}
            assert comm["ddp"] == {"all_reduce": F64 * n}
            assert comm["zero1"] == comm["zero2"] == {"reduce_scatter": B, "all_gather": B}
            assert comm["zero3"] == {"all_gather": 2 * B, "reduce_scatter": B}
            assert comm["zero3_keep"] == {"all_gather": B, "reduce_scatter": B}
    # shards do not overlap: together the ranks hold the (padded) parameters exactly once
    assert sum(r["zero3"]["bytes"].params for r in results) == F64 * padded


@pytest.mark.distributed
def test_zero3_frees_the_gathered_parameters_after_the_forward_unless_told_to_keep_them():
    config = GPTConfig.from_preset("nano", vocab_size=38, block_size=8)
    torch.manual_seed(0)
    state = GPT(config).double().state_dict()
    batch = torch.randint(0, config.vocab_size, (4, 9))
    full_bytes = F64 * GPT(config).num_params()
    for r in launch.spawn(lessons.resharding_worker, 2, config, state, batch, timeout_s=120):
        assert r[True] == (0, 0)  # ZeRO-3: nothing full survives the forward
        assert r[False] == (full_bytes, 0)  # kept for the backward (FSDP reshard_after_forward=False)


def test_comm_log_applies_the_ring_factors():
    from course_lib.distributed.zero import CommLog

    log = CommLog([("reduce_scatter", 800), ("all_gather", 800), ("all_gather", 800)])
    assert log.bytes("all_gather") == 1600 and log.bytes() == 2400
    assert log.ring_bytes_sent(4) == ring_bytes_per_step(800, 4, stage=3)
    assert CommLog([("all_reduce", 800)]).ring_bytes_sent(4) == ring_bytes_per_step(800, 4, stage=0)
