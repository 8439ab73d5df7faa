"""Checkpoints that survive crashes and load safely.

* :func:`save_checkpoint` writes to a temporary file in the same directory, flushes and
  ``fsync``\\ s it, then renames it over the target with ``os.replace`` (atomic on POSIX and
  Windows). A crash mid-write leaves the previous checkpoint untouched.
* :func:`load_checkpoint` uses ``torch.load(weights_only=True)``: tensors, numbers, strings,
  lists, tuples and dicts only. A file that asks to build any other object (and so could run
  code while unpickling) is refused with :class:`UntrustedCheckpointError`; its code never runs.
* :func:`rng_state` / :func:`set_rng_state` capture python's ``random``, numpy, torch CPU and
  CUDA generators as tensors and plain numbers, so they load under ``weights_only=True``.
* :func:`latest_checkpoint` and :func:`prune_checkpoints` keep the last K checkpoints: files
  ``ckpt_*.pt`` and, for sharded (FSDP2) models, directories ``ckpt_*.dcp`` written with
  ``torch.distributed.checkpoint`` (see :mod:`course_lib.train_state`).

The pretrained model later lessons start from is saved and loaded by :mod:`course_lib.pretrained`
(safetensors, no pickle at all).

What goes *into* a checkpoint is the caller's choice; :func:`course_lib.training.train` stores
model, optimizer, scheduler, scaler, the RNG and data position of every rank, the step and the
configs as plain dicts (never a pickled config object).
"""

from __future__ import annotations

import collections
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_GLOB = "ckpt_*"
_STEP_RE = re.compile(r"ckpt_(\d+)\.(pt|dcp)$")
DCP_STATE_FILE = "state.pt"  # inside a sharded checkpoint directory: everything but the shards


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupt."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint holds objects other than tensors and plain data (it could run code)."""


class UnloadableStateError(CheckpointError, TypeError):
    """:func:`save_checkpoint` was given an object that :func:`load_checkpoint` would refuse."""


# What ``torch.load(weights_only=True)`` rebuilds without any allow-listing (torch >= 2.6).
_PLAIN = (bool, int, float, complex, str, bytes, bytearray, type(None), torch.dtype, torch.device, torch.layout,
          torch.Size, torch.qscheme)
# exact types: other subclasses (namedtuple, defaultdict) are refused
_CONTAINERS = (dict, collections.OrderedDict, collections.Counter, list, tuple, set)


def _hint(value: Any) -> str:
    """How to turn ``value`` into something ``weights_only`` loads."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "store dataclasses.asdict(value) (and rebuild it with Class(**d) after loading)"
    if isinstance(value, torch.Tensor):  # a subclass: DTensor, a custom tensor type
        return ("store a plain tensor (value.full_tensor() for a DTensor), or save sharded state with "
                "torch.distributed.checkpoint")
    if isinstance(value, np.ndarray):
        return "store torch.from_numpy(value)"
    if isinstance(value, np.generic):
        return "store value.item() (a Python number)"
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return "store value._asdict() or tuple(value)"
    if isinstance(value, dict):
        return "store dict(value)"
    if isinstance(value, frozenset):
        return "store a list or a set"
    if isinstance(value, os.PathLike):
        return "store str(value)"
    if callable(getattr(value, "state_dict", None)):
        return "store value.state_dict() (and load_state_dict it after loading)"
    if hasattr(value, "value") and hasattr(value, "name") and type(value).__module__ != "builtins":
        return "store value.value or value.name (an enum member)"
    return "store tensors, numbers, strings, lists, tuples, sets or dicts of them instead"


def check_loadable(state: Any, where: str = "state") -> None:
    """Raise :class:`UnloadableStateError` unless :func:`load_checkpoint` can load ``state``.

    ``load_checkpoint`` uses ``torch.load(weights_only=True)``, which rebuilds only tensors
    (parameters included), Python numbers, strings, bytes, ``None``, ``torch.dtype``/``device``/
    ``Size``, and dicts, ordered dicts, lists, tuples and sets of them (plus any class registered
    with ``torch.serialization.add_safe_globals``). The error names the first offending entry
    (``state['config']``), its type, and how to store it instead.
    """
    safe = {g for g in torch.serialization.get_safe_globals() if isinstance(g, type)}
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [(where, state)]
    while todo:
        path, value = todo.pop()
        kind = type(value)
        if kind in _PLAIN or kind in safe:
            continue
        if kind in (torch.Tensor, torch.nn.Parameter):
            continue
        if kind in _CONTAINERS:
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, dict):
                for key, item in reversed(list(value.items())):
                    todo.append((f"{path} (a key)", key))
                    todo.append((f"{path}[{key!r}]", item))
            else:
                todo.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
            continue
        name = f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__
        raise UnloadableStateError(
            f"save_checkpoint: {path} is a {name}, which load_checkpoint (torch.load(weights_only=True)) "
            f"refuses to rebuild, so this checkpoint could never be loaded: {_hint(value)}"
        )


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """The file name used for the checkpoint after ``step`` optimizer steps."""
    return Path(directory) / f"ckpt_{step:08d}.pt"


def save_checkpoint(path: str | os.PathLike, **state: Any) -> Path:
    """Write ``state`` to ``path`` atomically and return the path.

    The data goes to a temporary file in the same directory (a rename is only atomic within
    one file system), is flushed and fsynced, then ``os.replace`` moves it into place. If
    anything fails before the rename, the temporary file is removed and whatever was at
    ``path`` before is still there, intact.

    Raises:
        UnloadableStateError: ``state`` holds an object :func:`load_checkpoint` would refuse
            (see :func:`check_loadable`); nothing is written.
    """
    check_loadable(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing anything unsafe.

    A sharded checkpoint directory (``ckpt_*.dcp``) loads too, in one process: its shards are
    consolidated into full tensors under ``"model"`` and ``"optimizer"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UntrustedCheckpointError: the file would build arbitrary Python objects.
        CheckpointError: the file is truncated or not a checkpoint at all.
    """
    path = Path(path)
    if path.is_dir() and (path / DCP_STATE_FILE).is_file():
        return _load_sharded(path, map_location)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise UntrustedCheckpointError(
                f"refusing to load {path}: it contains objects other than tensors and plain data, "
                "and unpickling them could run arbitrary code. Only load checkpoints you wrote "
                "yourself with course_lib.checkpoint.save_checkpoint."
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({e}); it may be truncated or corrupt") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({first}); it may be truncated or corrupt. "
            "Use an earlier checkpoint from the same directory."
        ) from None


def _load_sharded(path: Path, map_location: str | torch.device | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    state = load_checkpoint(path / DCP_STATE_FILE, map_location)
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(path), str(full))
        state.update(load_checkpoint(full, map_location))
    return state


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step in a checkpoint's name (``ckpt_00000042.pt`` or ``.dcp`` -> 42)."""
    match = _STEP_RE.search(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint (ckpt_XXXXXXXX.pt or .dcp)")
    return int(match.group(1))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint (``ckpt_*.pt`` file or ``ckpt_*.dcp`` directory) with the highest step in ``directory`` (None if there is none)."""
    found = _checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; return the deleted paths.

    Temporary files left by a writer that was killed mid-save (``.ckpt_*.tmp``) are removed
    too: call this from the process that writes the checkpoints, after a save has finished.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (keep at least the newest checkpoint), got {keep}")
    old = _checkpoints(directory)[:-keep]
    if Path(directory).is_dir():
        old += sorted(Path(directory).glob(f".{CHECKPOINT_GLOB}.tmp"))
    for p in old:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return old


def _checkpoints(directory: str | os.PathLike) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.glob(CHECKPOINT_GLOB) if (m := _STEP_RE.search(p.name))]
    return [p for _, p in sorted(found)]


# ---------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain numbers (loadable with ``weights_only``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    # only this process's own GPU generator: saving every visible GPU's (get_rng_state_all) breaks
    # a resume that sees a different set of GPUs, and each rank draws from its own GPU anyway
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state` (the GPU one into the current GPU)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # a checkpoint from before: one state per visible GPU
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])

