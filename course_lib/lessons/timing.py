"""Paired timing for the lessons' speed claims, robust to a busy machine.

The rules of ``benchmarks/throughput.py``, small enough to read in a notebook: warm each
candidate up, then time them in alternating rounds (the order rotates every round, so a busy
spell of the machine slows all alike), and compare them by the median of the *paired* ratios
with a distribution-free confidence interval for that median
(:func:`course_lib.profiling.median_interval`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

from course_lib.profiling import median_interval


def paired_times(
    fns: Mapping[str, Callable[[], object]], repeats: int = 9, warmup: int = 2,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` alternating rounds after ``warmup`` untimed ones.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read, so queued GPU work
    is counted. Round ``i`` runs the functions in the order rotated by ``i``.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            if sync:
                sync()
            start = time.perf_counter()
            fns[name]()
            if sync:
                sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> tuple[float, float, float]:
    """Median of the round-by-round ratios ``numerator[i] / denominator[i]`` and its 95% interval."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("paired_ratio needs two equally long, non-empty lists of times")
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    low, high = median_interval(ratios)
    return statistics.median(ratios), low, high
