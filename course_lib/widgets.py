"""Interactive widgets for the lessons (ipywidgets).

Each widget is a thin view over a tested pure function elsewhere in ``course_lib``: the widget
only reads its inputs, calls the function and shows the result, so the numbers a learner sees
are the numbers the tests check. Each result is shown in an element with a CSS class (for
example ``memory-result``) so a browser test can find it.
"""

from __future__ import annotations

import html
import math

import ipywidgets as widgets

from course_lib.memory import OPTIMIZERS, PRECISIONS, memory_breakdown

_MEMORY_PARTS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer state"))
_PART_COLOURS = {"weights": "#4c72b0", "gradients": "#dd8452", "optimizer": "#55a868"}


def format_gb(n_bytes: float) -> str:
    """Bytes as decimal gigabytes with one decimal, the unit GPU datasheets use: ``"112.0 GB"``."""
    return f"{n_bytes / 1e9:,.1f} GB"


def gpus_needed(n_bytes: float, gpu_gb: float) -> int:
    """How many GPUs of ``gpu_gb`` gigabytes hold ``n_bytes`` when the bytes are split evenly
    across them (ZeRO-3/FSDP style), ignoring activations and fragmentation."""
    if gpu_gb <= 0:
        raise ValueError(f"gpu_gb must be positive, got {gpu_gb}")
    return max(1, math.ceil(n_bytes / (gpu_gb * 1e9)))


def memory_result_html(n_params_billion: float, optimizer: str, precision: str, gpu_gb: float = 80.0) -> str:
    """The calculator's result as HTML: one bar per part, the total, and the GPUs it needs.

    The text it shows comes from :func:`course_lib.memory.memory_breakdown` through
    :func:`format_gb`.
    """
    parts = memory_breakdown(n_params_billion * 1e9, optimizer=optimizer, precision=precision)
    total = parts["total"]
    rows = []
    for key, label in _MEMORY_PARTS:
        width = 0.0 if total == 0 else 100.0 * parts[key] / total
        per_param = parts[key] / (n_params_billion * 1e9) if n_params_billion else 0.0
        rows.append(
            f"<tr><td>{label}</td><td style='text-align:right'>{format_gb(parts[key])}</td>"
            f"<td style='text-align:right'>{per_param:g} B/param</td>"
            f"<td style='width:220px'><div style='background:{_PART_COLOURS[key]};"
            f"width:{width:.1f}%;height:12px'></div></td></tr>"
        )
    n_gpus = gpus_needed(total, gpu_gb)
    return (
        f"<table>{''.join(rows)}</table>"
        f"<p><b class='memory-total'>Total: {format_gb(total)}</b> for "
        f"{html.escape(f'{n_params_billion:g}')}B parameters ({html.escape(optimizer)}, "
        f"{html.escape(precision)}): at least <b class='memory-gpus'>{n_gpus}</b> GPU(s) of "
        f"{gpu_gb:g} GB before any activation is stored.</p>"
    )


def memory_calculator_widget(
    n_params_billion: float = 7.0, optimizer: str = "adamw", precision: str = "mixed", gpu_gb: float = 80.0,
) -> widgets.VBox:
    """Training-memory calculator: parameters, optimizer and precision in; bytes per part out.

    The result lives in an ``HTML`` widget with the CSS class ``memory-result``; it is recomputed
    with :func:`memory_result_html` whenever an input changes.
    """
    params = widgets.BoundedFloatText(
        value=n_params_billion, min=0.001, max=100_000.0, step=1.0, description="Params (B)",
        style={"description_width": "initial"}, layout=widgets.Layout(width="180px"),
    )
    params.add_class("memory-params")
    opt = widgets.Dropdown(options=list(OPTIMIZERS), value=optimizer, description="Optimizer",
                           layout=widgets.Layout(width="220px"))
    opt.add_class("memory-optimizer")
    prec = widgets.Dropdown(options=list(PRECISIONS), value=precision, description="Precision",
                            layout=widgets.Layout(width="220px"))
    prec.add_class("memory-precision")
    gpu = widgets.Dropdown(options=sorted({16.0, 24.0, 40.0, 80.0, 141.0, float(gpu_gb)}), value=float(gpu_gb),
                           description="GPU (GB)",
                           layout=widgets.Layout(width="200px"))
    gpu.add_class("memory-gpu")
    result = widgets.HTML(value=memory_result_html(params.value, opt.value, prec.value, gpu.value))
    result.add_class("memory-result")

    def update(_change: object = None) -> None:
        result.value = memory_result_html(params.value, opt.value, prec.value, gpu.value)

    for control in (params, opt, prec, gpu):
        control.observe(update, names="value")
    box = widgets.VBox([widgets.HBox([params, opt, prec, gpu]), result])
    box.add_class("memory-calculator")
    return box


def pipeline_summary_html(kind: str, stages: int, microbatches: int) -> str:
    """The schedule explorer's numbers as HTML: predicted and scheduled bubble, activations held.

    Computed by :func:`course_lib.distributed.pipeline.bubble_fraction`,
    :func:`~course_lib.distributed.pipeline.schedule_bubble` and
    :func:`~course_lib.distributed.pipeline.peak_in_flight`.
    """
    from course_lib.distributed.pipeline import bubble_fraction, peak_in_flight, schedule, schedule_bubble

    makespan = max(e.t for e in schedule(kind, stages, microbatches)) + 1
    formula = bubble_fraction(stages, microbatches)
    predicted = (stages - 1) / stages if kind == "naive" else formula
    return (
        f"<p><b>{html.escape(kind)}</b>, {stages} stage(s), {microbatches} micro-batch(es): "
        f"{makespan} time slots; idle fraction <b class='pipeline-bubble'>{schedule_bubble(kind, stages, microbatches):.3f}</b> "
        f"(predicted {predicted:.3f}; GPipe/1F1B formula (P-1)/(M+P-1) = {formula:.3f}).<br>"
        f"Micro-batches whose activations each stage holds at most: "
        f"<span class='pipeline-peak'>{peak_in_flight(kind, stages, microbatches)}</span></p>"
    )


def pipeline_schedule_widget(stages: int = 4, microbatches: int = 8, kind: str = "1f1b") -> widgets.VBox:
    """Pipeline schedule explorer: stages, micro-batches and schedule in; timeline and bubble out.

    The timeline is :func:`course_lib.plots.plot_pipeline_timeline` of
    :func:`course_lib.distributed.pipeline.schedule`; the numbers (CSS class
    ``pipeline-result``) come from :func:`pipeline_summary_html`.
    """
    import matplotlib.pyplot as plt

    from course_lib.distributed.pipeline import KINDS, as_intervals, schedule
    from course_lib.plots import plot_pipeline_timeline

    stage_slider = widgets.IntSlider(value=stages, min=1, max=8, description="Stages (P)")
    stage_slider.add_class("pipeline-stages")
    micro_slider = widgets.IntSlider(value=microbatches, min=1, max=16, description="Micro-batches (M)",
                                     style={"description_width": "initial"})
    micro_slider.add_class("pipeline-microbatches")
    kind_menu = widgets.Dropdown(options=list(KINDS), value=kind, description="Schedule")
    kind_menu.add_class("pipeline-kind")
    result = widgets.HTML()
    result.add_class("pipeline-result")
    plot = widgets.Output()

    def update(_change: object = None) -> None:
        k, p, m = kind_menu.value, stage_slider.value, micro_slider.value
        result.value = pipeline_summary_html(k, p, m)
        plot.clear_output(wait=True)
        with plot:
            ax = plot_pipeline_timeline(as_intervals(schedule(k, p, m)), p, title=f"{k}: P={p}, M={m}")
            plt.show()
            plt.close(ax.figure)

    for control in (stage_slider, micro_slider, kind_menu):
        control.observe(update, names="value")
    update()
    box = widgets.VBox([widgets.HBox([kind_menu, stage_slider, micro_slider]), result, plot])
    box.add_class("pipeline-explorer")
    return box


def _si(x: float) -> str:
    """``7.0e10`` -> ``"70.0 B"``: parameter and token counts in words a reader can compare."""
    for value, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= value:
            return f"{x / value:,.1f} {unit}"
    return f"{x:,.0f}"


def compute_budget_html(log10_flops: float) -> str:
    """The compute-budget widget's result: each law's optimal N and D for 10**log10_flops FLOPs.

    Rows come from :func:`course_lib.scaling.allocation_table`; the GPU time from
    :func:`course_lib.scaling.gpu_hours` (one H100 at 40% MFU of its 989 TFLOP/s).
    """
    from course_lib.scaling import allocation_table, gpu_hours

    C = 10.0 ** log10_flops
    rows = "".join(
        f"<tr><td>{html.escape(str(r['law']))}</td><td style='text-align:right'>{_si(r['N'])}</td>"
        f"<td style='text-align:right'>{_si(r['D'])}</td>"
        f"<td style='text-align:right'>{r['tokens_per_param']:,.1f}</td>"
        f"<td style='text-align:right'>{r['loss']:.3f}</td></tr>"
        for r in allocation_table(C)
    )
    return (
        f"<p>Budget <b>{C:.2e}</b> FLOPs = {gpu_hours(C):,.0f} H100-hours at 40% MFU.</p>"
        "<table><tr><th>law</th><th>params N</th><th>tokens D</th><th>tokens/param</th>"
        f"<th>loss (Chinchilla fit)</th></tr>{rows}</table>"
    )


def compute_budget_widget(log10_flops: float = 21.0) -> widgets.VBox:
    """Compute-budget explorer: a budget in FLOPs in; each law's compute-optimal N and D out.

    The result (CSS class ``scaling-result``) is :func:`compute_budget_html` of the slider.
    """
    slider = widgets.FloatSlider(value=log10_flops, min=15.0, max=26.0, step=0.1, description="log10 FLOPs",
                                 style={"description_width": "initial"}, layout=widgets.Layout(width="420px"))
    slider.add_class("scaling-budget")
    result = widgets.HTML(value=compute_budget_html(slider.value))
    result.add_class("scaling-result")

    def update(_change: object = None) -> None:
        result.value = compute_budget_html(slider.value)

    slider.observe(update, names="value")
    box = widgets.VBox([slider, result])
    box.add_class("scaling-explorer")
    return box


def schedule_summary_html(base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> str:
    """The LR schedule explorer's numbers as HTML, all read off :func:`course_lib.schedulers.lr_at`:
    the learning rate at the first step, at the peak, half-way through the decay, at the end and
    beyond it (it holds at the floor)."""
    from course_lib.schedulers import lr_at

    def at(step: int) -> float:
        return lr_at(step, base_lr=base_lr, warmup_steps=warmup_steps, total_steps=total_steps,
                     min_lr_ratio=min_lr_ratio)

    mid = warmup_steps + (total_steps - warmup_steps) // 2
    points = [("first step (0)", 0), (f"peak ({warmup_steps})", warmup_steps), (f"mid-decay ({mid})", mid),
              (f"end ({total_steps})", total_steps), (f"beyond ({2 * total_steps})", 2 * total_steps)]
    cells = "".join(f"<td style='padding:0 8px'>{html.escape(name)}<br><b>{at(s):.3g}</b></td>" for name, s in points)
    return f"<table class='schedule-points'><tr>{cells}</tr></table>"


def schedule_explorer_widget(base_lr: float = 1e-3, warmup_steps: int = 100, total_steps: int = 1000,
                             min_lr_ratio: float = 0.1) -> widgets.VBox:
    """Learning-rate schedule explorer: warmup, total steps and floor in; the curve out.

    The curve is :func:`course_lib.schedulers.lr_at` drawn up to 1.3x ``total_steps`` (so you see it
    hold at the floor); the numbers (CSS class ``schedule-result``) come from
    :func:`schedule_summary_html`. Warmup is capped at the total, as ``lr_at`` requires.
    """
    import matplotlib.pyplot as plt

    from course_lib.schedulers import lr_at

    total = widgets.IntSlider(value=total_steps, min=10, max=5000, step=10, description="Total steps",
                              style={"description_width": "initial"})
    total.add_class("schedule-total")
    warmup = widgets.IntSlider(value=min(warmup_steps, total_steps), min=0, max=total_steps, description="Warmup",
                               style={"description_width": "initial"})
    warmup.add_class("schedule-warmup")
    floor = widgets.FloatSlider(value=min_lr_ratio, min=0.0, max=1.0, step=0.05, description="Floor (x peak)",
                                style={"description_width": "initial"})
    floor.add_class("schedule-floor")
    result = widgets.HTML()
    result.add_class("schedule-result")
    plot = widgets.Output()

    def update(_change: object = None) -> None:
        warmup.max = total.value  # keep warmup <= total
        w, t, f = warmup.value, total.value, floor.value
        result.value = schedule_summary_html(base_lr, w, t, f)
        steps = list(range(int(1.3 * t) + 1))
        plot.clear_output(wait=True)
        with plot:
            fig, ax = plt.subplots(figsize=(7, 3))
            ax.plot(steps, [lr_at(s, base_lr=base_lr, warmup_steps=w, total_steps=t, min_lr_ratio=f) for s in steps])
            ax.axvline(t, color="gray", ls=":", label="total_steps")
            ax.set(xlabel="step", ylabel="learning rate", title=f"warmup {w}, total {t}, floor {f:.2f} x peak")
            ax.legend()
            plt.show()
            plt.close(fig)

    for control in (total, warmup, floor):
        control.observe(update, names="value")
    update()
    box = widgets.VBox([widgets.HBox([warmup, total, floor]), result, plot])
    box.add_class("schedule-explorer")
    return box
