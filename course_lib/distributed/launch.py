"""Start a group of training processes, from a notebook or under torchrun.

Two ways to get ``world_size`` cooperating processes:

* :func:`spawn` (for notebooks and tests): starts the processes itself, sets up the process
  group in each one and returns what each rank's function returned. It is bounded: a rank that
  raises, exits or is killed makes ``spawn`` raise :class:`WorkerFailed` naming the rank and the
  cause, and every other process is stopped; nothing runs past ``timeout_s``.
* ``torchrun`` (for real jobs, one or many machines): torchrun starts the processes and sets
  ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; the script calls :func:`init_from_env`.

Rendezvous without a fixed port: the parent process opens a ``TCPStore`` on port 0, so the
operating system picks a free port, and hands its address to the workers. Two ``spawn`` calls
at once (two notebooks, two test runs) therefore never fight over ``MASTER_PORT``.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_POLL_S = 0.05  # how often the parent checks its workers
_GRACE_S = 5.0  # how long a terminated worker gets before it is killed


class WorkerFailed(RuntimeError):
    """A rank started by :func:`spawn` raised an exception or died.

    Attributes:
        rank: the global rank that failed first.
        cause: the worker's traceback text, or a description of how the process ended.
    """

    def __init__(self, rank: int, cause: str) -> None:
        super().__init__(f"rank {rank} failed: {cause}")
        self.rank = rank
        self.cause = cause


def default_backend(world_size: int) -> str:
    """``"nccl"`` when every rank can have its own CUDA GPU, otherwise ``"gloo"`` (CPU)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def _check_picklable(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Fail early, with the fix, when ``fn`` cannot be sent to a freshly started process."""
    qualname = getattr(fn, "__qualname__", repr(fn))
    module = getattr(fn, "__module__", None)
    reason = None
    if "<lambda>" in qualname:
        reason = "it is a lambda"
    elif "<locals>" in qualname:
        reason = "it is defined inside another function"
    elif module == "__main__" and not hasattr(sys.modules["__main__"], "__file__"):
        reason = "it is defined in a notebook or interactive session (module __main__)"
    if reason is None:
        try:
            pickle.dumps(fn)
        except Exception as exc:  # noqa: BLE001 - any pickling failure gets the same advice
            reason = f"it cannot be pickled ({type(exc).__name__}: {exc})"
    if reason is not None:
        raise ValueError(
            f"spawn() cannot start {qualname!r}: {reason}. New processes do not share this "
            "process's memory: they import the function by name, so move it into a module (a .py "
            "file, e.g. in course_lib) at top level and import it from there (in a notebook, the "
            "%%worker_module cell magic of course_lib.notebook_workers writes such a module)."
        )
    try:
        pickle.dumps(args)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(
            f"spawn() cannot send the arguments {args!r} to the workers ({type(exc).__name__}: {exc}); "
            "pass plain data (numbers, strings, tensors, dataclasses defined in a module)."
        ) from exc


def _context() -> Any:
    """The start method: on Linux a fork server that has imported torch once, else ``spawn``.

    Like ``spawn`` the fork server starts clean processes (no inherited threads or CUDA state)
    that import the worker function by name, but each new rank is forked from a server that
    already imported torch, so a notebook pays torch's import time once rather than on every
    call. (macOS frameworks are not safe to fork, so there it is plain ``spawn``.)
    """
    if sys.platform.startswith("linux") and "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", __name__])
        return ctx
    return mp.get_context("spawn")


def _dumps(value: Any) -> bytes:
    # torch.save instead of the queue's own pickling: tensors are copied into the message, so
    # they survive the worker's exit (shared-memory handles would not).
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _worker(
    rank: int,
    world_size: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    backend: str,
    store_port: int,
    prefix: str,
    timeout_s: float,
    results: Any,
    environ: dict[str, str],
) -> None:
    """Body of every process started by :func:`spawn` (module level, so it can be pickled)."""
    # The fork server was started with the environment of the first spawn() call; use the
    # caller's environment of *this* call, as a freshly spawned process would.
    os.environ.clear()
    os.environ.update(environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one machine: the local rank is the global rank
        else:
            torch.set_num_threads(1)  # ranks share the CPU cores; oversubscription slows all
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timeout)
        dist.init_process_group(
            backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size, timeout=timeout
        )
        value = fn(rank, world_size, *args)
        dist.destroy_process_group()
        results.put((rank, "ok", time.time(), _dumps(value)))
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        # Report before tearing anything down: the other ranks fail as soon as this one
        # leaves the group, and the parent names whichever rank failed first.
        results.put((rank, "error", time.time(), traceback.format_exc()))


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"process exited with code {code} before returning (its output above may say why)"


def _stop(processes: list[Any]) -> None:
    """Terminate, then kill, then reap every process still alive."""
    processes = [p for p in processes if p.pid is not None]  # skip any that never started
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _GRACE_S
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
        p.join()
        p.close()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    timeout_s: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes; return their results.

    Each process gets an initialised default process group (``torch.distributed`` is ready to
    use), ``gloo`` on CPU with one thread per rank, or ``nccl`` with GPU ``rank`` when every
    rank has its own GPU. The group is destroyed when ``fn`` returns.

    Args:
        fn: a function defined at the top level of a module (not in a notebook, not nested,
            not a lambda): new processes import it by name.
        world_size: number of processes (ranks ``0 .. world_size-1``).
        *args: extra arguments passed to ``fn`` after ``rank, world_size``; must be picklable.
        backend: ``"gloo"`` or ``"nccl"``; ``None`` picks :func:`default_backend`.
        timeout_s: upper bound in seconds for the whole run, start-up included.

    Returns:
        ``[fn's return value on rank 0, on rank 1, ...]`` (tensors come back on the CPU).

    Raises:
        ValueError: ``fn`` or ``args`` cannot be sent to a new process, or bad arguments.
        WorkerFailed: a rank raised (``cause`` holds its traceback) or died (exit code/signal).
        TimeoutError: the ranks had not all finished after ``timeout_s`` seconds.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    backend = default_backend(world_size) if backend is None else backend
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"backend='nccl' needs one GPU per rank: world_size={world_size} but "
            f"{torch.cuda.device_count()} GPU(s) visible; use backend='gloo' or fewer ranks"
        )
    _check_picklable(fn, args)

    # Port 0: the operating system picks a free port. The workers connect to it as clients.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    prefix = f"spawn-{os.getpid()}-{time.monotonic_ns()}"
    ctx = _context()
    results = ctx.Queue()
    processes = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, fn, args, backend, store.port, prefix, timeout_s, results, dict(os.environ)),
            name=f"course-rank-{rank}",  # not a daemon: a rank may start DataLoader workers
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout_s
    outputs: dict[int, Any] = {}
    errors: dict[int, tuple[float, str]] = {}  # rank -> (when it failed, traceback)
    deaths: dict[int, str] = {}  # rank -> how its process ended without a result
    silent_since: dict[int, float] = {}  # rank -> when it exited cleanly with no result yet
    settle_until: float | None = None
    try:
        for p in processes:
            p.start()
        while len(outputs) < world_size:
            now = time.monotonic()
            if settle_until is not None and now > settle_until:
                break
            if now > deadline:
                missing = [r for r in range(world_size) if r not in outputs]
                raise TimeoutError(
                    f"spawn() timed out after {timeout_s:g} s; ranks {missing} had not finished "
                    "(a rank waiting for a collective that another rank never calls hangs like this)"
                )
            try:
                rank, status, when, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                pass
            else:
                if status == "ok":
                    outputs[rank] = _loads(payload)
                else:
                    errors[rank] = (when, payload)
            for rank, p in enumerate(processes):
                if rank in outputs or rank in errors or rank in deaths or p.exitcode is None:
                    continue
                if p.exitcode != 0:
                    deaths[rank] = _describe_exit(p.exitcode)
                elif now - silent_since.setdefault(rank, now) > 1.0:
                    deaths[rank] = _describe_exit(0)
            if (errors or deaths) and settle_until is None:
                # One failure makes the other ranks fail too (their peer vanished); wait a
                # moment so that the rank that failed first, the real cause, can be named.
                settle_until = time.monotonic() + 1.0
        if deaths:
            rank = min(deaths)
            raise WorkerFailed(rank, deaths[rank])
        if errors:
            rank = min(errors, key=lambda r: errors[r][0])
            raise WorkerFailed(rank, errors[rank][1])
        return [outputs[rank] for rank in range(world_size)]
    finally:
        _stop(processes)
        results.close()
        results.join_thread()
        del store


def init_from_env(backend: str | None = None, timeout_s: float = 600.0,
                  device: str | torch.device | None = None) -> tuple[int, int, int]:
    """Join the process group that ``torchrun`` describes in the environment.

    torchrun sets ``RANK`` (global rank, unique across all machines), ``LOCAL_RANK`` (rank on
    this machine), ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. On GPUs the process
    uses ``cuda:LOCAL_RANK``: the global rank would name a GPU that does not exist on the
    second machine. Without these variables (a plain ``python script.py``) nothing is
    initialised and the run is a single process.

    The backend follows ``device`` when given (cuda -> nccl, anything else -> gloo), so CPU
    processes on a machine with GPUs still use gloo; without it, nccl wherever CUDA works.

    Returns:
        ``(rank, local_rank, world_size)``; ``(0, 0, 1)`` when not launched by torchrun.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 0, 1
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None and device is not None:
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this machine shows {torch.cuda.device_count()} GPU(s): start at "
                "most one process per GPU (--nproc_per_node), or hide the GPUs (CUDA_VISIBLE_DEVICES=) "
                "to train on CPU processes over gloo"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    return rank, local_rank, world_size


def is_distributed() -> bool:
    """True when a process group is initialised (under :func:`spawn` or torchrun)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank, or 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of ranks in the group, or 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def rank_device() -> torch.device:
    """This rank's device: its GPU (``cuda:LOCAL_RANK``, set at start-up) under nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_main_process() -> bool:
    """True on rank 0 (or in a single process): the one that prints, logs and saves."""
    return get_rank() == 0


def cleanup() -> None:
    """Destroy the process group if there is one (safe to call more than once)."""
    if is_distributed():
        dist.destroy_process_group()
