"""The CUDA/NCCL paths, checked on a CPU machine with mocked torch.cuda: precision, backend, timing, RNG, versions."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib
import torch
import torch.distributed as dist

from course_lib import checkpoint, device
from course_lib.distributed import data_parallel as dp
from course_lib.distributed import launch
from course_lib.precision import needs_grad_scaler

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ a pretend GPU machine

GPUS = {"T4": (7, 5), "V100": (7, 0), "A100": (8, 0), "H100": (9, 0)}


def _fake_gpu_machine(monkeypatch, names: list[str], nccl: bool = True) -> None:
    """``names`` GPUs visible; is_bf16_supported answers like torch: True on any GPU with emulation."""
    caps = [GPUS[n] for n in names]
    current = {"index": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[current["index"] if i is None else i])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        name=f"Tesla {names[getattr(i, 'index', i) or 0]}", major=caps[getattr(i, "index", i) or 0][0],
        minor=caps[getattr(i, "index", i) or 0][1], total_memory=16 * 2**30))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (10 * 2**30, 16 * 2**30))

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return caps[current["index"]][0] >= 8 or including_emulation

    class _Switch:  # torch.cuda.device(i): make GPU i current for the block
        def __init__(self, i):
            self.i, self.before = i, current["index"]

        def __enter__(self):
            current["index"] = self.i

        def __exit__(self, *exc):
            current["index"] = self.before

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", _Switch)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: nccl)


# ------------------------------------------------------------------ 3. bf16 only with bf16 units


@pytest.mark.parametrize("gpu, bf16", [("T4", False), ("V100", False), ("A100", True), ("H100", True)])
def test_bf16_only_on_gpus_with_bf16_units_and_fp16_with_a_scaler_below(monkeypatch, gpu, bf16):
    _fake_gpu_machine(monkeypatch, [gpu])
    assert torch.cuda.is_bf16_supported()  # what the old check asked: True even on a T4 (emulation)
    assert ("bf16" in device.supported_precisions("cuda")) is bf16
    assert "fp16" in device.supported_precisions("cuda")
    best = device.best_precision("cuda")
    assert best == ("bf16" if bf16 else "fp16")
    assert needs_grad_scaler(best) is not bf16  # a T4 trains in fp16 with a GradScaler
    checks = {c.name: c for c in device.run_checks()}
    assert checks["bf16"].ok is bf16
    if not bf16:  # the doctor's advice for old GPUs is reachable
        assert "this GPU predates bf16" in checks["bf16"].line()


def test_bf16_is_decided_by_the_device_in_question_not_the_current_one(monkeypatch):
    _fake_gpu_machine(monkeypatch, ["T4", "A100"])  # current device: the T4
    assert device.cuda_bf16_native("cuda:1") and device.supported_precisions("cuda:1")[1] == "bf16"
    assert not device.cuda_bf16_native("cuda:0") and not device.cuda_bf16_native(0)
    assert torch.cuda.current_device() == 0  # switched back


def test_bf16_check_without_the_including_emulation_keyword(monkeypatch):
    _fake_gpu_machine(monkeypatch, ["A100"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # an older signature
    assert device.cuda_bf16_native("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    assert not device.cuda_bf16_native("cuda")  # the capability alone decides then


# ------------------------------------------------------------------ 4. the backend follows the device


def test_backend_for_follows_the_device(monkeypatch):
    _fake_gpu_machine(monkeypatch, ["H100", "H100"])
    assert device.backend_for("cuda") == device.backend_for(torch.device("cuda", 1)) == "nccl"
    assert device.backend_for("cpu") == device.backend_for("mps") == "gloo"
    assert launch.default_backend(2) == "nccl" and launch.default_backend(4) == "gloo"  # a GPU per rank
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)  # e.g. Windows
    assert device.backend_for("cuda") == "gloo"


def _torchrun_env(monkeypatch, local_rank: int = 0) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": str(local_rank), "WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)


def test_device_cpu_under_torchrun_on_a_gpu_machine_uses_gloo(monkeypatch):
    _fake_gpu_machine(monkeypatch, ["H100", "H100"])
    _torchrun_env(monkeypatch)
    try:
        assert launch.init_from_env(device="cpu") == (0, 0, 1)  # the old code initialised NCCL here
        assert dist.get_backend() == "gloo"
    finally:
        launch.cleanup()


def test_nccl_under_torchrun_binds_the_local_gpu(monkeypatch):
    _fake_gpu_machine(monkeypatch, ["H100", "H100"])
    _torchrun_env(monkeypatch, local_rank=1)
    calls: dict = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("set_device", i))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.init_from_env() == (1, 1, 2)  # device None: cuda:LOCAL_RANK -> nccl
    assert calls["backend"] == "nccl" and calls["set_device"] == 1
    assert calls["device_id"] == torch.device("cuda", 1)
    calls.clear()
    launch.init_from_env(device="cuda")
    assert calls["backend"] == "nccl"
    calls.clear()
    launch.init_from_env(device="cpu")
    assert calls["backend"] == "gloo" and "device_id" not in calls and "set_device" not in calls


# ------------------------------------------------------------------ 5. DDP communication timing


class _FakeEvent:
    """A CUDA event on a pretend GPU clock (``clock[0]`` seconds)."""

    clock = [0.0]

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.t: float | None = None

    def record(self) -> None:
        self.t = self.clock[0]

    def synchronize(self) -> None:
        assert self.t is not None

    def elapsed_time(self, other: _FakeEvent) -> float:
        return (other.t - self.t) * 1e3  # milliseconds, as torch.cuda.Event does


def test_comm_timing_uses_cuda_events_on_cuda(monkeypatch):
    assert dp.times_with_cuda_events(torch.device("cuda", 0))
    assert not dp.times_with_cuda_events(torch.device("cpu"))
    _FakeEvent.clock[0] = 100.0
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(dp, "times_with_cuda_events", lambda d: True)  # pretend the bucket is on a GPU
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    def all_reduce(buffer, async_op=False):  # NCCL: enqueued at once, the kernel takes 0.25 s on the GPU
        _FakeEvent.clock[0] += 0.25
        fut = torch.futures.Future()
        fut.set_result([buffer.mul_(2)])  # the sum over two equal ranks
        return SimpleNamespace(get_future=lambda: fut)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    timer = dp.CommTimer()
    for _ in range(2):
        bucket = SimpleNamespace(buffer=lambda: torch.ones(10))
        out = dp._timed_allreduce_hook(timer, bucket).wait()
        torch.testing.assert_close(out, torch.ones(10))  # the mean over ranks, as DDP's default
    # the GPU time of the two collectives, not the host's (microseconds, at enqueue)
    assert timer.calls == 2 and timer.seconds == pytest.approx(0.5) and timer.bytes == 80
    assert timer.records[1] == pytest.approx((0.25, 0.5, 40))
    timer.reset()
    assert timer.calls == 0


def _completed_all_reduce(seconds: float):
    """A stand-in for dist.all_reduce(async_op=True) over two equal ranks that takes ``seconds``."""
    import time

    def all_reduce(buffer, async_op=False):
        time.sleep(seconds)  # gloo: the host waits while the data moves
        fut = torch.futures.Future()
        fut.set_result([buffer.mul_(2)])
        return SimpleNamespace(get_future=lambda: fut)

    return all_reduce


def test_comm_timing_on_cpu_keeps_the_host_clock(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", None)  # the CPU path must not touch CUDA events
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", _completed_all_reduce(0.05))
    timer = dp.CommTimer()
    out = dp._timed_allreduce_hook(timer, SimpleNamespace(buffer=lambda: torch.full((4,), 3.0))).wait()
    torch.testing.assert_close(out, torch.full((4,), 3.0))
    ((start, end, nbytes),) = timer.records
    assert end - start >= 0.05 and nbytes == 16


# ------------------------------------------------------------------ 6. RNG state: this device's generator only


def test_rng_state_saves_and_restores_only_the_current_gpus_generator(monkeypatch):
    _fake_gpu_machine(monkeypatch, ["H100", "H100", "H100", "H100"])
    mine = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": mine.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))

    def every_gpu(*args):
        raise AssertionError("the generators of every visible GPU must not be saved or restored")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_gpu)
    state = checkpoint.rng_state()
    assert torch.equal(state["cuda"], mine)
    # resume where only one GPU is visible (CUDA_VISIBLE_DEVICES=3): it still loads
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    checkpoint.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], mine)
    # a checkpoint written before (one state per visible GPU): the current GPU's entry, if any
    checkpoint.set_rng_state({**state, "cuda": [mine + 1, mine + 2]})
    assert torch.equal(restored[-1], mine + 1)


def test_cpu_rng_round_trip_is_exact():
    state = checkpoint.rng_state()
    assert "cuda" not in state or torch.cuda.is_available()
    a = torch.rand(5)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(5), a)


# ------------------------------------------------------------------ 8. the torch range claimed is the one supported


def test_pyproject_claims_the_torch_the_code_is_checked_on():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"torch\b", d)]
    assert spec.replace(" ", "") == f"torch>={device.MIN_TORCH[0]}.{device.MIN_TORCH[1]}"
    assert device.MIN_TORCH >= (2, 11)
    assert device.torch_version() >= device.MIN_TORCH


def test_pipelining_without_scale_grads_fails_naming_the_version(monkeypatch):
    import torch.distributed.pipelining as pipelining

    from course_lib.distributed import pipeline as pp

    class OldSchedule:  # the signature of a torch whose schedules lack scale_grads=
        def __init__(self, stage, n_microbatches, loss_fn=None):
            raise AssertionError("must not be constructed")

    monkeypatch.setattr(pipelining, "ScheduleGPipe", OldSchedule)
    monkeypatch.setattr(pipelining, "PipelineStage", lambda *a, **k: None)
    stage = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match=r"scale_grads=.*torch >= 2\.11"):
        pp.torch_pipeline_step(stage, 0, 1, 1, "gpipe", torch.zeros(1, 2, dtype=torch.long),
                               torch.zeros(1, 2, dtype=torch.long))
