"""Ring attention over 2 and 3 gloo ranks against full attention on one process (float64)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from course_lib.attention import tiled_attention
from course_lib.distributed.context_parallel import (
    expected_pairs,
    sequence_positions,
    shard_sequence,
    unshard_sequence,
)
from course_lib.distributed.launch import spawn
from course_lib.lessons.context_parallel import (
    full_attention,
    gather_case,
    make_inputs,
    ring_cases_worker,
    work_per_rank,
)
from course_lib.memory import saved_activation_bytes

CASES = [(causal, layout) for causal in (False, True) for layout in ("contiguous", "zigzag")]
SHAPE = (2, 2, 24, 4)  # batch, heads, sequence (a multiple of 2N for N = 2, 3), head dim


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"world{n}")
def ring_run(request: pytest.FixtureRequest) -> tuple[int, list[list[dict[str, Any]]]]:
    """One spawn per world size runs every case; the tests below read its results."""
    n = request.param
    return n, spawn(ring_cases_worker, n, CASES, SHAPE, 0, timeout_s=180)


@pytest.mark.distributed
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{'causal' if c else 'full'}-{l}" for c, l in CASES])
def test_ring_attention_equals_full_attention(ring_run: Any, case: int) -> None:
    n, per_rank = ring_run
    causal, layout = CASES[case]
    ref = full_attention(*make_inputs(*SHAPE, seed=0), causal=causal)
    got = gather_case(per_rank, case)
    for name in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-12, msg=f"{name} at world size {n}")


@pytest.mark.distributed
def test_causal_work_imbalanced_contiguous_balanced_zigzag(ring_run: Any) -> None:
    n, per_rank = ring_run
    work = {(c, l): work_per_rank(per_rank, i) for i, (c, l) in enumerate(CASES)}
    assert work[(False, "contiguous")] == work[(False, "zigzag")] == [4 * n] * n
    assert work[(True, "contiguous")] == [4 * r + 3 for r in range(n)]  # last rank does the most
    assert work[(True, "zigzag")] == [2 * n + 1] * n  # every rank the same
    for causal, layout in CASES:
        assert work[(causal, layout)] == [expected_pairs(r, n, layout, causal) for r in range(n)]
    # the total is the same (half the 2N x 2N chunk pairs plus the diagonal); only its spread differs
    assert sum(work[(True, "contiguous")]) == sum(work[(True, "zigzag")]) == 2 * n * (2 * n + 1) // 2


@pytest.mark.distributed
def test_zigzag_trace_meets_every_unmasked_pair_once(ring_run: Any) -> None:
    n, per_rank = ring_run
    i = CASES.index((True, "zigzag"))
    pairs = sorted((qc, kc) for r in per_rank for _, qc, kc in r[i]["trace"])
    assert pairs == sorted((qc, kc) for qc in range(2 * n) for kc in range(qc + 1))


@pytest.mark.distributed
def test_saved_bytes_per_rank_are_full_over_n(ring_run: Any) -> None:
    n, per_rank = ring_run
    q, k, v, _ = (x.requires_grad_() for x in make_inputs(*SHAPE, seed=0))
    single = saved_activation_bytes(lambda: tiled_attention(q, k, v, causal=True))
    b, h, t, d = SHAPE
    assert single.total == b * h * t * (4 * d + 1) * 8  # q, k, v, out and lse, float64
    for i in range(len(CASES)):
        assert [r[i]["saved"] for r in per_rank] == [single.total // n] * n


def test_zigzag_split_and_unpermute() -> None:
    assert sequence_positions(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert sequence_positions(8, 2, 1, "zigzag").tolist() == [2, 3, 4, 5]
    assert sequence_positions(8, 2, 1, "contiguous").tolist() == [4, 5, 6, 7]
    x = torch.arange(2 * 36).reshape(2, 36, 1)
    for n in (1, 2, 3):
        for layout in ("contiguous", "zigzag"):
            parts = [shard_sequence(x, n, r, layout) for r in range(n)]
            assert torch.equal(unshard_sequence(parts, layout), x)
    with pytest.raises(ValueError, match="multiple of"):
        sequence_positions(10, 3, 0, "zigzag")
