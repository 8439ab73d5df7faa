"""The environment doctor: GPU lines, collective backends, and a fix for every failed check."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from course_lib import device
from course_lib.device import backend_checks, doctor, gpu_checks, run_checks


def _fake_gpus(monkeypatch, n: int, free_gib: float = 10.0, total_gib: float = 16.0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        name=f"Fake GPU {i}", major=7, minor=5, total_memory=int(total_gib * 2**30)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int(free_gib * 2**30), int(total_gib * 2**30)))


def test_real_machine_report_is_consistent():
    checks = {c.name: c for c in run_checks()}
    assert checks["gloo"].ok == (torch.distributed.is_available() and torch.distributed.is_gloo_available())
    if not torch.cuda.is_available():
        assert "gpu" in checks and "gpu 0" not in checks
    lines: list[str] = []
    assert doctor(lines.append) == all(c.ok for c in checks.values())
    assert len(lines) == len(checks)


def test_every_failed_check_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_gloo_available", lambda: False)
    monkeypatch.setattr(device, "KEY_PACKAGES", ("torch", "surely-not-an-installed-package"))
    lines: list[str] = []
    assert doctor(lines.append) is False
    failed = [l for l in lines if l.startswith("[FAIL]")]
    assert any(l.startswith("[FAIL] gloo") for l in failed)
    assert any("surely-not-an-installed-package" in l for l in failed)
    for line in failed:
        assert "  -> " in line and len(line.split("  -> ")[1]) > 10, line


def test_gpu_lines_name_each_gpu_with_memory(monkeypatch):
    _fake_gpus(monkeypatch, 2, free_gib=10.0)
    checks = gpu_checks()
    assert [c.name for c in checks] == ["gpu 0", "gpu 1"]
    assert all(c.ok for c in checks)
    assert "Fake GPU 1, 16.0 GiB (10.0 GiB free), compute capability 7.5" == checks[1].detail


def test_busy_gpu_fails_with_a_fix(monkeypatch):
    _fake_gpus(monkeypatch, 1, free_gib=0.25)
    (check,) = gpu_checks()
    assert not check.ok and "nvidia-smi" in check.line()


def test_driver_without_cuda_torch_is_flagged(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(device.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    (check,) = gpu_checks()
    assert not check.ok and "pytorch.org/get-started/locally" in check.fix


@pytest.mark.parametrize("n_gpus, nccl, ok", [(0, False, True), (1, False, True), (2, False, False), (2, True, True)])
def test_nccl_is_required_only_with_several_gpus(monkeypatch, n_gpus, nccl, ok):
    if n_gpus:
        _fake_gpus(monkeypatch, n_gpus)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: nccl)
    check = {c.name: c for c in backend_checks()}["nccl"]
    assert check.ok is ok
    if not ok:
        assert "WSL2" in check.fix and "gloo" in check.fix
