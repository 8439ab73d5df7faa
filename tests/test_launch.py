"""spawn(): results come back, failures are named and bounded, nothing is left running."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from course_lib.distributed import launch
from course_lib.distributed.launch import WorkerFailed, spawn

# Worker functions live at module level: spawned processes import them by name.


def _report(rank: int, world_size: int, scale: float) -> dict:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {
        "rank": rank,
        "world_size": world_size,
        "sum": t * scale,
        "backend": dist.get_backend(),
        "threads": torch.get_num_threads(),
        "helpers": (launch.is_distributed(), launch.get_rank(), launch.get_world_size()),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "master_port": os.environ.get("MASTER_PORT"),
        "device": launch.rank_device(),
        # ranks are not daemons, so they may start DataLoader worker processes of their own
        "loaded": [int(x) for b in DataLoader(range(4), batch_size=2, num_workers=1) for x in b],
    }


def _fail_on_rank_1(rank: int, world_size: int, how: str, pid_dir: str) -> None:
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    if rank == 1:
        if how == "raise":
            raise ValueError("bad batch shape on purpose")
        if how == "exit":
            os._exit(3)
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # rank 0 would wait here forever for the failed rank
    time.sleep(600)


def _sleep_forever(rank: int, world_size: int, pid_dir: str) -> None:
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    time.sleep(600)


def _assert_all_gone(pid_dir: Path) -> None:
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("course-rank")]
    for pid in [int(p.read_text()) for p in pid_dir.glob("*.pid")]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.distributed
def test_results_come_back_in_rank_order_with_one_thread_per_rank():
    out = spawn(_report, 2, 10.0, timeout_s=120)
    assert [r["rank"] for r in out] == [0, 1]
    for r in out:
        assert r["world_size"] == 2
        assert torch.equal(r["sum"], torch.tensor([30.0]))  # (1 + 2) * 10, all-reduced
        assert r["backend"] == "gloo"
        assert r["threads"] == 1
        assert r["helpers"] == (True, r["rank"], 2)
        assert r["local_rank"] == r["rank"]
        assert r["device"] == torch.device("cpu")
        assert r["loaded"] == [0, 1, 2, 3]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "how, expected",
    [("raise", "ValueError: bad batch shape on purpose"), ("exit", "exited with code 3"), ("sigkill", "SIGKILL")],
)
def test_a_failing_rank_is_named_with_its_cause_and_nothing_is_left(tmp_path, how, expected):
    start = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        spawn(_fail_on_rank_1, 2, how, str(tmp_path), timeout_s=60)
    elapsed = time.monotonic() - start
    assert info.value.rank == 1
    assert expected in info.value.cause
    assert "rank 1" in str(info.value)
    assert elapsed < 45, f"failure took {elapsed:.1f} s to surface"
    _assert_all_gone(tmp_path)


@pytest.mark.distributed
def test_timeout_stops_every_rank(tmp_path):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out"):
        spawn(_sleep_forever, 2, str(tmp_path), timeout_s=5)
    # bounded: the timeout, the grace before SIGKILL, and slack for a cold, busy machine
    assert time.monotonic() - start < 5 + launch._GRACE_S + 20
    _assert_all_gone(tmp_path)


@pytest.mark.distributed
def test_two_spawns_at_once_do_not_collide(monkeypatch):
    # A fixed MASTER_PORT that is already taken must not matter: spawn never uses it.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        taken = str(busy.getsockname()[1])
        monkeypatch.setenv("MASTER_PORT", taken)
        results: dict[int, list] = {}
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                results[i] = spawn(_report, 2, float(i + 1), timeout_s=120)
            except BaseException as exc:  # noqa: BLE001 - surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i in range(2):
        # the workers see the caller's environment at the time of the call
        assert {r["master_port"] for r in results[i]} == {taken}
        assert [float(r["sum"]) for r in results[i]] == [3.0 * (i + 1)] * 2


def _outer():
    def nested(rank, world_size):
        return rank

    return nested


@pytest.mark.parametrize("fn", [lambda rank, world_size: rank, _outer()], ids=["lambda", "nested"])
def test_unpicklable_worker_is_refused_with_the_fix(fn):
    with pytest.raises(ValueError, match="move it into a module"):
        spawn(fn, 2)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="world_size"):
        spawn(_report, 0)
    with pytest.raises(ValueError, match="backend"):
        spawn(_report, 1, backend="mpi")


def test_torchrun_helpers_without_and_with_torchrun_environment(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launch.init_from_env() == (0, 0, 1)
    assert not launch.is_distributed() and launch.get_rank() == 0 and launch.get_world_size() == 1

    with socket.socket() as s:  # what torchrun would export for a one-process job
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    try:
        assert launch.init_from_env(backend="gloo") == (0, 0, 1)
        assert launch.is_distributed() and launch.is_main_process()
    finally:
        launch.cleanup()
    assert not launch.is_distributed()
    launch.cleanup()  # idempotent
