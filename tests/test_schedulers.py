"""Warmup + cosine schedule: closed form, parity with transformers, resumable, warmup 0 allowed."""

import math

import pytest
import torch

from course_lib.checkpoint import load_checkpoint, save_checkpoint
from course_lib.schedulers import lr_at, warmup_cosine

BASE, WARMUP, TOTAL, FLOOR = 3e-4, 10, 110, 0.1


def _closed_form(step):
    if step < WARMUP:
        return BASE * step / WARMUP
    progress = min(1.0, (step - WARMUP) / (TOTAL - WARMUP))
    return BASE * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),
    (5, BASE * 0.5),                            # half-way through warmup
    (10, BASE),                                 # peak
    (60, BASE * (FLOOR + (1 - FLOOR) * 0.5)),   # cosine mid-point
    (110, BASE * FLOOR),                        # end: the floor
    (500, BASE * FLOOR),                        # beyond the end: stays at the floor
])
def test_lr_at_matches_the_closed_form(step, expected):
    got = lr_at(step, base_lr=BASE, warmup_steps=WARMUP, total_steps=TOTAL, min_lr_ratio=FLOOR)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert got == pytest.approx(_closed_form(step), rel=1e-12, abs=1e-18)


def test_never_climbs_back_after_total_steps():
    lrs = [lr_at(s, base_lr=1.0, warmup_steps=5, total_steps=50, min_lr_ratio=0.0) for s in range(5, 200)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))
    # the tutorial's schedule (Errata 8): a raw cosine of step / total climbs back after total
    raw = [0.5 * (1 + math.cos(math.pi * s / 50)) for s in range(50, 100)]
    assert raw[-1] > raw[0] + 0.9


@pytest.mark.slow  # importing transformers takes a few seconds
def test_matches_transformers_with_zero_floor():
    from transformers import get_cosine_schedule_with_warmup

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE)
    reference = get_cosine_schedule_with_warmup(opt, num_warmup_steps=WARMUP, num_training_steps=TOTAL)
    for step in range(TOTAL + 1):
        ours = lr_at(step, base_lr=BASE, warmup_steps=WARMUP, total_steps=TOTAL, min_lr_ratio=0.0)
        assert ours == pytest.approx(reference.get_last_lr()[0], rel=1e-9, abs=1e-15), step
        opt.step()
        reference.step()


def _opt():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=BASE)


def test_scheduler_follows_lr_at_and_resumes_through_a_safe_checkpoint(tmp_path):
    opt = _opt()
    sched = warmup_cosine(opt, WARMUP, TOTAL, FLOOR)
    seen = []
    for _ in range(40):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([_closed_form(s) for s in range(40)], rel=1e-12, abs=1e-18)
    save_checkpoint(tmp_path / "s.pt", optimizer=opt.state_dict(), scheduler=sched.state_dict())
    expected = []
    for _ in range(100):
        expected.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()

    state = load_checkpoint(tmp_path / "s.pt")  # weights_only=True: the state is plain data
    opt2 = _opt()
    sched2 = warmup_cosine(opt2, WARMUP, TOTAL, FLOOR)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    resumed = []
    for _ in range(100):
        resumed.append(sched2.get_last_lr()[0])
        opt2.step()
        sched2.step()
    assert resumed == expected


def test_zero_warmup_starts_at_the_peak():
    assert lr_at(0, base_lr=1.0, warmup_steps=0, total_steps=10, min_lr_ratio=0.1) == 1.0
    opt = _opt()
    sched = warmup_cosine(opt, 0, 10)
    assert sched.get_last_lr()[0] == pytest.approx(BASE)
    assert lr_at(1, base_lr=1.0, warmup_steps=10, total_steps=10) == pytest.approx(0.1)  # all warmup


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_steps=0), "total_steps"),
    (dict(warmup_steps=20, total_steps=10), "warmup_steps"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
])
def test_bad_schedules_raise(kwargs, match):
    args = dict(base_lr=1.0, warmup_steps=0, total_steps=10, min_lr_ratio=0.1, **{})
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lr_at(0, **args)
    with pytest.raises(ValueError, match=match):
        warmup_cosine(_opt(), args["warmup_steps"], args["total_steps"], args["min_lr_ratio"])


def test_schedule_explorer_numbers_come_from_lr_at():
    from course_lib.widgets import schedule_explorer_widget, schedule_summary_html

    text = schedule_summary_html(2e-3, 10, 110, 0.25)
    for step in (0, 10, 60, 110, 220):
        assert f"<b>{lr_at(step, base_lr=2e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.25):.3g}</b>" in text
    assert "<b>0.0005</b>" in text and "<b>0.002</b>" in text  # floor 0.25 x peak; the peak
    box = schedule_explorer_widget(base_lr=2e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.25)
    result = next(w for w in box.children if "schedule-result" in w._dom_classes)
    assert result.value == text
    warmup_slider = box.children[0].children[0]
    warmup_slider.value = 0  # warmup 0 is allowed: the first step is already the peak
    assert "first step (0)<br><b>0.002</b>" in result.value


def test_wsd_warms_up_holds_then_decays_linearly_to_the_floor():
    from course_lib.schedulers import wsd_lr_at

    lrs = [wsd_lr_at(s, base_lr=1.0, warmup_steps=4, decay_start=10, decay_steps=5, min_lr_ratio=0.1)
           for s in range(20)]
    assert lrs[:4] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert lrs[4:11] == pytest.approx([1.0] * 7)
    assert lrs[11:16] == pytest.approx([1 - 0.9 * k / 5 for k in range(1, 6)])
    assert lrs[16:] == pytest.approx([0.1] * 4)


def test_wsd_branch_from_a_checkpoint_resumes_on_the_same_curve():
    from course_lib.schedulers import warmup_stable_decay, wsd_lr_at

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = warmup_stable_decay(opt, warmup_steps=2, decay_start=6, decay_steps=4)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched2 = warmup_stable_decay(opt2, warmup_steps=2, decay_start=6, decay_steps=4)
    opt2.load_state_dict(opt.state_dict())  # the optimizer carries the current lr, the scheduler the step
    sched2.load_state_dict(state)
    for step in range(5, 12):
        assert opt2.param_groups[0]["lr"] == pytest.approx(
            wsd_lr_at(step, base_lr=0.5, warmup_steps=2, decay_start=6, decay_steps=4))
        opt2.step()
        sched2.step()
    with pytest.raises(ValueError, match="decay_start"):
        wsd_lr_at(0, base_lr=1.0, warmup_steps=5, decay_start=3, decay_steps=2)
