"""Matplotlib helpers shared by the lessons and widgets (each plots the output of a tested function)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt

_OP_COLOURS = {"F": "#4c72b0", "B": "#dd8452"}


def plot_pipeline_timeline(
    intervals: Sequence[Any], stages: int | None = None, ax: Any = None, title: str | None = None,
    unit: str = "time slot",
) -> Any:
    """Gantt chart of a pipeline: one row per stage, forward (blue) and backward (orange) boxes.

    ``intervals`` are :class:`course_lib.distributed.pipeline.Interval` records, either from
    ``as_intervals(schedule(...))`` (unit time slots) or measured by ``run_schedule`` (seconds).
    White space is the bubble: a stage waiting for its neighbour. Each box is labelled with its
    micro-batch. Returns the matplotlib ``Axes``.
    """
    if not intervals:
        raise ValueError("nothing to plot: intervals is empty")
    stages = 1 + max(i.stage for i in intervals) if stages is None else stages
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * stages))
    span = max(i.end for i in intervals) - min(i.start for i in intervals)
    for i in intervals:
        width = i.end - i.start
        ax.barh(i.stage, width, left=i.start, height=0.8, color=_OP_COLOURS.get(i.op, "grey"),
                edgecolor="white", linewidth=0.5)
        if width > 0.025 * span:
            ax.text(i.start + width / 2, i.stage, str(i.microbatch), ha="center", va="center",
                    color="white", fontsize=8)
    ax.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
    ax.set_ylim(stages - 0.5, -0.5)
    ax.set_xlabel(unit)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _OP_COLOURS.values()]
    ax.legend(handles, ["forward", "backward"], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: covers no box
    if title:
        ax.set_title(title)
    return ax


def readable_log_ticks(ax: Any, max_ticks: int = 6) -> Any:
    """Put the ticks of every log axis of ``ax`` at plotted values, labelled as plain numbers.

    Matplotlib's default log ticks are powers of ten, often one or none across a narrow range.
    This reads the data of the lines and scatter points already drawn, picks up to ``max_ticks``
    values spread evenly in log space, rounds them to two significant digits and labels them
    with ``:g``. Call it after plotting. Returns ``ax``.
    """
    import math

    import numpy as np
    from matplotlib.ticker import NullLocator

    for axis, scale in (("x", ax.get_xscale()), ("y", ax.get_yscale())):
        if scale != "log":
            continue
        values = []
        for line in ax.get_lines():
            values.extend(np.asarray(line.get_xdata() if axis == "x" else line.get_ydata(), dtype=float).ravel())
        for coll in ax.collections:
            offsets = np.asarray(coll.get_offsets(), dtype=float)
            if offsets.size:
                values.extend(offsets[:, 0 if axis == "x" else 1])
        values = [v for v in values if np.isfinite(v) and v > 0]
        if not values:
            continue
        low, high = math.log10(min(values)), math.log10(max(values))
        ticks = sorted({float(f"{10 ** x:.2g}") for x in np.linspace(low, high, max_ticks)})
        which = ax.xaxis if axis == "x" else ax.yaxis
        getattr(ax, f"set_{axis}ticks")(ticks, [f"{t:g}" for t in ticks])
        which.set_minor_locator(NullLocator())
    return ax
