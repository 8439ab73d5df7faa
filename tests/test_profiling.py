"""course_lib.profiling: grouping profiler events, the roofline maths, paired timing, kernel counts."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from course_lib.model import GPT, GPTConfig
from course_lib.profiling import (
    GROUPS,
    arithmetic_intensity,
    attainable_flops,
    count_generated_kernels,
    event_group,
    gelu_cost,
    group_allocations,
    group_times,
    layernorm_cost,
    matmul_cost,
    op_group,
    paired_speedup,
    paired_times,
    ridge_point,
)
from course_lib.training import TrainConfig, make_optimizer


@pytest.mark.parametrize("name, group", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x128", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_efficient_attention_backward", "attention"),
    ("aten::gelu", "elementwise"), ("aten::native_layer_norm", "elementwise"),
    ("aten::_log_softmax_backward_data", "elementwise"), ("aten::copy_", "elementwise"),
    ("aten::mm_made_up", "elementwise"), ("aten::t", "elementwise"),  # only whole matmul names
    ("autograd::engine::evaluate_function: AddmmBackward0", "matmul"), ("MmBackward0", "matmul"),
    ("autograd::engine::evaluate_function: GeluBackward0", "elementwise"), ("TBackward0", "elementwise"),
    ("ScaledDotProductFlashAttentionForCpuBackward0", "attention"),
    ("Optimizer.step#AdamW.step", "optimizer"), ("aten::_fused_adamw_", "optimizer"),
    ("aten::_foreach_mul_", "optimizer"), ("data", "data"),
    ("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", "data"),
])
def test_op_group_by_name(name, group):
    assert op_group(name) == group


class FakeEvent:
    def __init__(self, name, self_us, parent=None, mem=0):
        self.name, self.self_cpu_time_total, self.cpu_parent, self.self_cpu_memory_usage = name, self_us, parent, mem


def test_events_inside_the_optimizer_or_data_regions_belong_to_them():
    step = FakeEvent("Optimizer.step#AdamW.step", 100)
    inner = FakeEvent("aten::add_", 50, parent=FakeEvent("aten::_foreach_add_", 0, parent=step))
    data = FakeEvent("data", 10)
    copy = FakeEvent("aten::copy_", 20, parent=data, mem=4096)
    mm = FakeEvent("aten::mm", 300, mem=1000)
    free = FakeEvent("aten::gelu", 5, mem=-512)
    assert event_group(inner) == "optimizer" and event_group(copy) == "data"
    attention = FakeEvent("aten::_scaled_dot_product_flash_attention_for_cpu", 40)
    assert event_group(FakeEvent("aten::empty", 1, parent=attention)) == "attention"
    assert event_group(FakeEvent("aten::mm", 1, parent=FakeEvent("aten::gelu", 0))) == "matmul"
    times = group_times([step, inner, data, copy, mm, free])
    assert list(times) == list(GROUPS)
    assert times == pytest.approx({"matmul": 300e-6, "attention": 0.0, "elementwise": 5e-6,
                                   "optimizer": 150e-6, "data": 30e-6})
    assert group_allocations([copy, mm, free]) == {"matmul": 1000, "attention": 0, "elementwise": 0,
                                                   "optimizer": 0, "data": 4096}


def test_device_time_counts_each_kernel_once_through_the_operator_that_launched_it():
    from torch.autograd import DeviceType

    op = FakeEvent("aten::mm", 10)
    op.self_device_time_total = 70.0  # the kernels this operator launched
    kernel = FakeEvent("ampere_sgemm_128x64", 0)
    kernel.device_type, kernel.self_device_time_total = DeviceType.CUDA, 70.0
    assert group_times([op, kernel], "self_device_time_total")["matmul"] == pytest.approx(70e-6)
    assert group_times([op, kernel])["matmul"] == pytest.approx(10e-6)


def test_a_real_training_step_is_grouped_and_adds_up_to_the_profile_total():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    opt = make_optimizer(model, TrainConfig())
    ids = torch.randint(0, 64, (4, 17))

    def step():
        with record_function("data"):
            x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        model(x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.events()
    times = group_times(events)
    assert all(times[g] > 0 for g in GROUPS)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    assert sum(times.values()) == pytest.approx(total)
    assert group_allocations(events)["matmul"] > 0


def test_roofline_maths():
    flops, nbytes = matmul_cost(128, 256, 512)
    assert flops == 2 * 128 * 256 * 512
    assert nbytes == 4 * (128 * 256 + 256 * 512 + 128 * 512)
    assert arithmetic_intensity(100.0, 50.0) == 2.0
    with pytest.raises(ValueError, match="positive"):
        arithmetic_intensity(1.0, 0.0)
    peak, bw = 1e12, 1e11
    assert ridge_point(peak, bw) == 10.0
    assert attainable_flops(2.0, peak, bw) == 2e11  # memory-bound: intensity x bandwidth
    assert attainable_flops(50.0, peak, bw) == peak  # compute-bound: the flat roof
    assert attainable_flops(ridge_point(peak, bw), peak, bw) == peak  # the two meet at the ridge
    # at the model's sizes a GELU or LayerNorm does about one FLOP per byte, a matmul hundreds
    assert arithmetic_intensity(*gelu_cost(1 << 20)) == pytest.approx(9 / 8)
    assert arithmetic_intensity(*layernorm_cost(1024, 128)) == pytest.approx(1.0, rel=0.01)
    assert arithmetic_intensity(*matmul_cost(1024, 128, 512)) > 40
    assert layernorm_cost(2, 3, bytes_per_element=2) == (48, 2 * (12 + 6))


def test_paired_times_alternate_and_the_speedup_sees_a_real_difference():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = paired_times(fns, reps=3, warmup=1)
    assert order == ["a", "b"] * 4 and [len(t) for t in times.values()] == [3, 3]
    slow, fast = [2.0, 2.2, 1.8, 4.0, 2.1], [1.0, 1.1, 0.9, 2.0, 1.05]  # a busy round hits both
    assert paired_speedup(slow, fast) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_speedup([1.0], [1.0, 2.0])


def test_count_generated_kernels_counts_generated_code_not_library_calls():
    code = ("cpp_fused_add_0 = async_compile.cpp_pybinding(['float*'], r'''...''')\n"
            "triton_poi_fused_gelu_1 = async_compile.triton('triton_poi', '''...''')\n"
            "extern_kernels.mm(buf0, arg1_1, out=buf1)\n"
            "cpp_fused_add_0(buf2, buf0)\n")
    assert count_generated_kernels(code) == 2
    assert count_generated_kernels("extern_kernels.mm(a, b, out=c)") == 0


@pytest.mark.slow
def test_inductor_fuses_a_pointwise_chain_into_one_kernel():
    from torch._inductor.utils import run_and_get_code

    def chain(x, b, r):
        return torch.nn.functional.gelu(x + b, approximate="tanh") * 0.5 + r

    x, b, r = torch.randn(64, 32), torch.randn(32), torch.randn(64, 32)
    out, codes = run_and_get_code(torch.compile(chain), x, b, r)
    torch.testing.assert_close(out, chain(x, b, r))
    assert sum(count_generated_kernels(c) for c in codes) == 1  # three eager kernels become one
