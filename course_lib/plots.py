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
    ax.legend(handles, ["forward", "backward"], loc="upper right", fontsize=8, framealpha=0.9)
    if title:
        ax.set_title(title)
    return ax
