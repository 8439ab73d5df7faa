"""Mixed precision: scaler choice, fp16 underflow rescued by loss scaling, overflow steps skipped."""

import pytest
import torch

from course_lib.lessons.mixed_precision import gradient_magnitudes, overflow_demo, underflow_demo
from course_lib.precision import autocast, make_grad_scaler, needs_grad_scaler


def test_scaler_only_for_fp16():
    assert [needs_grad_scaler(p) for p in ("fp32", "bf16", "fp16")] == [False, False, True]
    assert make_grad_scaler("cpu", "fp16").is_enabled()
    assert not make_grad_scaler("cpu", "bf16").is_enabled()
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast("cpu", "fp8")
    with autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_fp16_underflow_and_loss_scaling_are_deterministic():
    demo = underflow_demo()
    ref = gradient_magnitudes()
    # the backward pass delivers each gradient rounded to the autocast dtype: compare with a cast
    torch.testing.assert_close(demo.fp16, ref.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(demo.bf16, ref.bfloat16().float(), rtol=0, atol=0)
    scale = demo.loss_scale
    torch.testing.assert_close(demo.fp16_scaled, (ref * scale).half().float() / scale, rtol=0, atol=0)
    tiny = 2.0**-24  # fp16's smallest subnormal
    assert torch.all(demo.fp16[ref < tiny / 2] == 0) and torch.all(demo.fp16[ref > tiny] > 0)
    assert demo.zeroed["fp16"] > 0.3
    assert demo.zeroed["fp16_scaled"] == 0 and demo.zeroed["bf16"] == 0
    assert underflow_demo().zeroed == demo.zeroed  # same result every run


def test_overflowing_step_is_skipped_and_scale_lowered():
    demo = overflow_demo(init_scale=2.0**16)
    assert demo.skipped
    assert demo.scale_after_overflow == demo.scale_before * 0.5  # GradScaler's backoff_factor
    assert demo.updated_after and demo.scale_after_normal == demo.scale_after_overflow
    # a scale small enough that the same gradient fits in fp16 is not an overflow
    assert not overflow_demo(init_scale=2.0**10).skipped
