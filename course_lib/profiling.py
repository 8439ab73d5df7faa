"""Where a training step's time goes: profiler events by kind, the roofline, paired timing.

``group_times`` sorts the events of a ``torch.profiler`` run into five kinds of work
(:data:`GROUPS`): matrix multiplies, attention, elementwise and other memory-bound operators,
the optimizer, and the data pipeline. An operator called inside ``optimizer.step`` or inside a
``record_function("data")`` region belongs to that region whatever its name, and a helper
operator inside a matmul or attention operator (an allocation, a transpose) to that operator.

The roofline: an operator doing ``flops`` of arithmetic while moving ``bytes_moved`` to and from
memory has arithmetic intensity ``flops / bytes_moved``; on a machine with peak ``P`` FLOP/s
and memory bandwidth ``B`` bytes/s it can reach at most ``min(P, intensity * B)``. Below the
ridge point ``P / B`` an operator is memory-bound: only moving fewer bytes (fusion) speeds it up.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.autograd import DeviceType

GROUPS: tuple[str, ...] = ("matmul", "attention", "elementwise", "optimizer", "data")

_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot", "_scaled_mm"}
_ATTENTION = re.compile(r"scaled_?dot_?product|attention", re.I)
_OPTIMIZER = re.compile(r"^Optimizer\.|_fused_adam|_foreach_", re.I)
_DATA = re.compile(r"^data$|DataLoader", re.I)


def _base_name(name: str) -> str:
    """``aten::addmm`` -> ``addmm``; autograd's ``...evaluate_function: AddmmBackward0`` -> ``addmm``."""
    base = name.rsplit(": ", 1)[-1].rsplit("::", 1)[-1]
    return re.sub(r"_?backward\d*$", "", base, flags=re.I).lower()


def op_group(name: str) -> str:
    """The kind of work an operator's name says it does, one of :data:`GROUPS`.

    A backward operator (``MmBackward0``, ``aten::gelu_backward``) belongs with its forward
    operator. Everything that is not a matmul, attention, optimizer or data operator counts as
    ``elementwise``: pointwise maths, normalisation, softmax and loss, copies and reductions --
    the memory-bound rest.
    """
    if _DATA.search(name):
        return "data"
    if _OPTIMIZER.search(name):
        return "optimizer"
    if _ATTENTION.search(name):
        return "attention"
    base = _base_name(name)
    if base in _MATMULS or "gemm" in base:
        return "matmul"
    return "elementwise"


def event_group(event: Any) -> str:
    """The group of a profiler ``FunctionEvent``, with the regions and operators around it.

    Inside ``optimizer.step`` or the data region an event belongs to that region. An operator
    that is elementwise by name (an ``aten::empty``, a transpose) but runs inside a matmul or
    attention operator is that operator's work and belongs to its group.
    """
    own, inherited = op_group(event.name), None
    parent = event.cpu_parent
    while parent is not None:
        group = op_group(parent.name)
        if group in ("optimizer", "data"):
            return group
        if inherited is None and group in ("matmul", "attention"):
            inherited = group
        parent = parent.cpu_parent
    return inherited if own == "elementwise" and inherited is not None else own


def group_times(events: Iterable[Any], attr: str = "self_cpu_time_total") -> dict[str, float]:
    """Seconds of self time per group, summed over a profile's ``events()``.

    Self time excludes the time of an event's children, so every microsecond is counted once.
    ``attr="self_device_time_total"`` sums the GPU kernels' time instead (a CUDA profile).
    """
    totals = dict.fromkeys(GROUPS, 0.0)
    for event in events:
        if attr != "self_cpu_time_total" and getattr(event, "device_type", DeviceType.CPU) != DeviceType.CPU:
            continue  # a device kernel's time is already in the self device time of the operator that launched it
        totals[event_group(event)] += getattr(event, attr) / 1e6  # the profiler counts microseconds
    return totals


def group_allocations(events: Iterable[Any]) -> dict[str, int]:
    """Bytes allocated per group (positive ``self_cpu_memory_usage``; frees are left out).

    Needs a profile taken with ``profile_memory=True``.
    """
    totals = dict.fromkeys(GROUPS, 0)
    for event in events:
        totals[event_group(event)] += max(int(event.self_cpu_memory_usage), 0)
    return totals


def arithmetic_intensity(flops: float, bytes_moved: float) -> float:
    """FLOPs per byte moved to or from memory."""
    if bytes_moved <= 0:
        raise ValueError(f"bytes_moved must be positive, got {bytes_moved}")
    return flops / bytes_moved


def attainable_flops(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """The roofline: ``min(peak_flops, intensity * bandwidth)`` FLOP/s."""
    return min(peak_flops, intensity * bandwidth)


def ridge_point(peak_flops: float, bandwidth: float) -> float:
    """Intensity (FLOP/byte) where the roofline turns flat: below it an operator is memory-bound."""
    return peak_flops / bandwidth


def matmul_cost(m: int, k: int, n: int, bytes_per_element: int = 4) -> tuple[int, int]:
    """FLOPs and bytes of ``(m, k) @ (k, n)``: ``2mkn`` and both inputs read, the output written once."""
    return 2 * m * k * n, (m * k + k * n + m * n) * bytes_per_element


def layernorm_cost(rows: int, width: int, bytes_per_element: int = 4) -> tuple[int, int]:
    """FLOPs and bytes of a LayerNorm over ``rows`` vectors of ``width``.

    Per element: the mean (1 add), the variance (subtract, square, add), normalise (subtract,
    multiply) and the affine (multiply, add): 8 FLOPs. Bytes: the input read and the output
    written once, plus the weight and bias.
    """
    return 8 * rows * width, (2 * rows * width + 2 * width) * bytes_per_element


def gelu_cost(numel: int, bytes_per_element: int = 4) -> tuple[int, int]:
    """FLOPs and bytes of the tanh GELU ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))``.

    9 FLOPs per element (the cube 2, the scale and add 2, the outer scale 1, tanh counted as 1,
    the add 1, the two products 2); one read and one write per element.
    """
    return 9 * numel, 2 * numel * bytes_per_element


def count_generated_kernels(code: str) -> int:
    """Kernels that inductor generated in one output-code module (C++ on CPU, Triton on GPU).

    ``code`` is one string from ``torch._inductor.utils.run_and_get_code``; library calls that
    inductor does not generate (``extern_kernels.mm``, the matmuls) are not counted.
    """
    return len(re.findall(r"async_compile\.(?:cpp_pybinding|cpp|triton)\(", code))


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval for the median of ``values``.

    The true median lies between the k-th smallest and the k-th largest value with probability
    at least ``confidence``, where k is the largest rank with P(Binomial(n, 1/2) < k) <= alpha/2.
    Needs no assumption about the shape of the timing distribution (timings are skewed).
    """
    n = len(values)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    ordered = sorted(values)
    tail, k = 0.0, 0
    while k < n // 2:
        tail += math.comb(n, k) / 2**n  # P(Binomial < k+1)
        if tail > (1 - confidence) / 2:
            break
        k += 1
    if k == 0:  # too few values for this confidence: the interval is the whole range
        return ordered[0], ordered[-1]
    return ordered[k - 1], ordered[n - k]


def paired_times(
    fns: Mapping[str, Callable[[], Any]], reps: int = 15, warmup: int = 2, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in alternation after ``warmup`` untimed rounds.

    Alternating means a neighbour that slows the machine for a while slows every function in
    that round alike, so the per-round ratios stay clean even when the absolute times do not.
    """
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t0)
    return times


def paired_speedup(slow: list[float], fast: list[float]) -> tuple[float, float, float]:
    """Median of the per-round ratios ``slow / fast`` and its 95% interval (> 1: ``fast`` is faster)."""
    if len(slow) != len(fast):
        raise ValueError(f"paired timings need equal lengths, got {len(slow)} and {len(fast)}")
    ratios = [s / f for s, f in zip(slow, fast, strict=True)]
    low, high = median_interval(ratios)
    return statistics.median(ratios), low, high
