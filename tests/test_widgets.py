"""The memory calculator widget shows exactly what course_lib.memory.memory_breakdown computes."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("ipywidgets")

from course_lib.memory import memory_breakdown  # noqa: E402
from course_lib.widgets import format_gb, gpus_needed, memory_calculator_widget, memory_result_html  # noqa: E402


def _find(box, css_class):
    stack = [box]
    while stack:
        w = stack.pop()
        if css_class in getattr(w, "_dom_classes", ()):
            return w
        stack.extend(getattr(w, "children", ()))
    raise AssertionError(f"no widget with class {css_class}")


def _shown_total(result) -> str:
    return re.search(r"Total: ([\d,.]+ GB)", result.value).group(1)


def test_format_gb_and_gpus_needed():
    assert format_gb(112e9) == "112.0 GB"
    assert format_gb(1.12e12) == "1,120.0 GB"
    assert gpus_needed(112e9, 80) == 2
    assert gpus_needed(80e9, 80) == 1
    assert gpus_needed(0, 80) == 1
    with pytest.raises(ValueError, match="gpu_gb"):
        gpus_needed(1e9, 0)


def test_default_shows_16_bytes_per_param_for_7b():
    box = memory_calculator_widget()
    result = _find(box, "memory-result")
    # 7B parameters x 16 bytes (mixed-precision AdamW) = 112 GB, independent of the code under test
    assert _shown_total(result) == "112.0 GB"
    assert "2 B/param" in result.value and "12 B/param" in result.value
    assert "<b class='memory-gpus'>2</b>" in result.value


@pytest.mark.parametrize("billions, optimizer, precision", [(70.0, "adamw", "mixed"), (1.5, "sgd", "fp32"),
                                                            (13.0, "sgd_momentum", "autocast")])
def test_changing_inputs_updates_the_result(billions, optimizer, precision):
    box = memory_calculator_widget()
    result = _find(box, "memory-result")
    before = result.value
    _find(box, "memory-params").value = billions
    _find(box, "memory-optimizer").value = optimizer
    _find(box, "memory-precision").value = precision
    assert result.value != before
    expected = memory_breakdown(billions * 1e9, optimizer=optimizer, precision=precision)
    assert _shown_total(result) == format_gb(expected["total"])
    for key in ("weights", "gradients", "optimizer"):
        assert format_gb(expected[key]) in result.value
    assert result.value == memory_result_html(billions, optimizer, precision, 80.0)


def test_gpu_size_changes_gpu_count():
    box = memory_calculator_widget(n_params_billion=70.0)
    result = _find(box, "memory-result")
    assert "<b class='memory-gpus'>14</b>" in result.value  # 1120 GB / 80 GB
    _find(box, "memory-gpu").value = 40.0
    assert "<b class='memory-gpus'>28</b>" in result.value


def test_bad_choice_names_the_options():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        memory_result_html(7.0, "adafactor", "mixed")
