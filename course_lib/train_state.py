"""Everything a run needs to continue exactly, and the checkpointer that saves it atomically.

* :class:`DataPosition` wraps the batch source and records how far training has read it, so a
  resumed run sees the very next batch: a source with ``state_dict()``/``load_state_dict()``
  (``course_lib.data.RandomWindowBatches``) restores its own state; a list, a tuple or a
  ``DataLoader`` with a deterministic sampler (sequential, ``DistributedSampler`` as
  ``make_loader`` builds it, or ``DynamicBatchSampler``) is replayed up to the recorded offset,
  in the recorded epoch. A source that
  can do neither (a generator, a shuffling ``DataLoader``) is refused when checkpoints are
  asked for, with the fix, instead of silently restarting from batch 0 on resume.
* :class:`TrainState`: model, optimizer, scheduler, GradScaler, data position, the RNG of every
  rank and the step, with ``state_dict()`` / ``load_state_dict()``.
* :class:`Checkpointer`: rank 0 decides which checkpoint to resume from and every rank checks
  it can read it; saving writes to a temporary name and renames it into place. A replicated
  model (single process, DDP) is one file ``ckpt_XXXXXXXX.pt`` written by rank 0; a sharded
  model (FSDP2) is a directory ``ckpt_XXXXXXXX.dcp`` in which every rank writes its own shards
  with ``torch.distributed.checkpoint`` and rank 0 adds ``state.pt`` (the rest).
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from course_lib.checkpoint import (
    DCP_STATE_FILE,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from course_lib.parallel import Parallelism, real_tokens

__all__ = ["RESUME_KEYS", "DataPosition", "TrainState", "Checkpointer", "check_resume_config"]

# TrainConfig fields whose change would make a resumed run a different run (the CLI checks the
# flags of the same names, plus its own).
RESUME_KEYS = ("steps", "lr", "weight_decay", "betas", "eps", "warmup_steps", "min_lr_ratio",
               "grad_accum", "clip_grad_norm", "precision", "seed")


def check_resume_config(saved: Mapping[str, Any], now: Mapping[str, Any], path: Path) -> None:
    """Refuse to resume ``path`` when a setting in :data:`RESUME_KEYS` changed."""
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_KEYS if saved.get(k) != now[k]]
    if changed:
        raise ValueError(
            f"cannot resume from {path}: these settings differ from the checkpoint's ({'; '.join(changed)}). "
            "Resume with the same settings, or start a new run in another directory."
        )


# ----------------------------------------------------------------------------- data position


def _replay_reason(batches: Any) -> str | None:
    """Why ``batches`` cannot be replayed to an offset (``None`` = it can)."""
    from torch.utils.data import DataLoader, RandomSampler

    if isinstance(batches, (list, tuple)):
        return None
    if isinstance(batches, DataLoader):
        if isinstance(batches.sampler, RandomSampler):
            return ("it is a DataLoader with shuffle=True, which draws a new order every time it is "
                    "iterated; use make_loader(...) (a seeded DistributedSampler) or shuffle=False")
        return None
    return f"it is a {type(batches).__name__} without state_dict()/load_state_dict()"


class DataPosition:
    """The batch source of a run and how far training has read it.

    :meth:`next_window` reads up to ``k`` host (CPU) batches and moves them to the device. On CUDA
    each batch is copied from pinned memory with ``non_blocking=True`` one batch ahead, so the
    copy overlaps the previous micro-step (a non-blocking copy from pageable memory would block
    the host). :meth:`state_dict` describes the batches *consumed*, never the one prefetched.
    """

    def __init__(self, batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device,
                 resumable_required: bool = False) -> None:
        self.source = batches
        self.device = torch.device(device)
        self.stateful = hasattr(batches, "state_dict") and hasattr(batches, "load_state_dict")
        reason = None if self.stateful else _replay_reason(batches)
        self.replayable = reason is None
        if resumable_required and not self.replayable:
            raise ValueError(
                f"train() cannot checkpoint this run: a resumed run could not continue the data where it "
                f"stopped, because `batches` cannot record its position ({reason}). Pass a list of "
                "batches, course_lib.data.RandomWindowBatches, a DataLoader from make_loader(...), or any "
                "object with state_dict()/load_state_dict(); or set out_dir=None (no checkpoints)."
            )
        self.position = 0  # batches consumed (the replay offset)
        self._skip = 0
        self._iter: Iterator[Any] | None = None
        self._ahead: tuple[Any, dict[str, torch.Tensor], int, int, dict[str, torch.Tensor]] | None = None
        self._done = False
        self._prefetch = self.device.type == "cuda"

    def _epoch_sampler(self) -> Any:
        """The DataLoader's sampler that has epochs (DistributedSampler, DynamicBatchSampler), if any."""
        for sampler in (getattr(self.source, "batch_sampler", None), getattr(self.source, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                return sampler
        return None

    def _epoch(self) -> int | None:
        return getattr(self._epoch_sampler(), "epoch", None)

    def _pull(self) -> tuple[Any, dict[str, torch.Tensor], int, int, dict[str, torch.Tensor]] | None:
        """Read one host batch; return (source state before it, host batch, counts, device batch)."""
        if self._iter is None:
            self._iter = iter(self.source)
            if self._skip:
                self._iter = itertools.islice(self._iter, self._skip, None)
        before = self.source.state_dict() if self.stateful else None
        try:
            batch = next(self._iter)
        except StopIteration:
            return None
        real = real_tokens(batch["labels"])
        inputs = batch["input_ids"].numel()
        if self._prefetch:
            moved = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        else:
            moved = {k: v.to(self.device) for k, v in batch.items()}
        return before, batch, real, inputs, moved

    def next_window(self, k: int) -> list[tuple[dict[str, torch.Tensor], int, int]]:
        """Up to ``k`` micro-batches as ``(device batch, real tokens, input tokens)`` (fewer at the end).

        The batch after the window is read (and, on CUDA, its copy started) before returning,
        so :meth:`exhausted` knows whether the data ends here and the copy overlaps the step.
        """
        window = []
        for _ in range(k):
            item = self._ahead if self._ahead is not None else self._pull()
            self._ahead = None
            if item is None:
                self._done = True
                break
            self.position += 1
            window.append((item[4], item[2], item[3]))
        if not self._done:
            self._ahead = self._pull()
            self._done = self._ahead is None
        return window

    def exhausted(self) -> bool:
        """True when no batch follows the last window read."""
        return self._done

    def state_dict(self) -> Any:
        """The source's own state (stateful sources) or ``{"position", "epoch"}`` (replayed ones)."""
        if self.stateful:
            return self._ahead[0] if self._ahead is not None else self.source.state_dict()
        return {"position": self.position, "epoch": self._epoch()}

    def load_state_dict(self, state: Any) -> None:
        """Continue after the batches recorded in ``state``."""
        if state is None:
            return
        if self.stateful:
            self.source.load_state_dict(state)
            return
        if not self.replayable:
            raise ValueError("the checkpoint holds a data position but `batches` cannot be replayed; "
                             "pass the same kind of batch source as the interrupted run")
        if state.get("epoch") is not None and self._epoch_sampler() is not None:
            self._epoch_sampler().set_epoch(state["epoch"])
        self.position = self._skip = int(state["position"])
        # Start iterating now, before the RNG is restored: a DataLoader draws its base seed from
        # torch's generator when iterated, as the interrupted run did before its checkpoint.
        self._iter = itertools.islice(iter(self.source), self._skip, None)


# ----------------------------------------------------------------------------- train state


@dataclass
class TrainState:
    """What a checkpoint holds: restore all of it and the run continues bit for bit.

    ``rng`` and ``data`` are per rank: each rank has its own dropout stream and batches, so the
    saved state lists every rank's (gathered in :meth:`state_dict`; every rank must call it).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    data: DataPosition
    parallel: Parallelism
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        if self.parallel.sharded:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model, optimizer = get_state_dict(self.model, self.optimizer)
        else:
            model, optimizer = self.parallel.model_state(self.model), self.optimizer.state_dict()
        return {
            "model": model,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self.parallel.gather_object(rng_state()),
            "data": self.parallel.gather_object(self.data.state_dict()),
            "step": self.step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        world = self.parallel.world_size
        if len(state["rng"]) != world:
            raise ValueError(f"the checkpoint was written by {len(state['rng'])} rank(s); resume it with the "
                             f"same number of processes, not {world}")
        if self.parallel.sharded:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
        else:
            self.parallel.load_model_state(self.model, state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.data.load_state_dict(state["data"][self.parallel.rank])
        set_rng_state(state["rng"][self.parallel.rank])
        self.step = int(state["step"])


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Save and restore a :class:`TrainState` in ``out_dir``, keeping the newest ``keep``."""

    def __init__(self, out_dir: str | os.PathLike | None, keep: int, parallel: Parallelism) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.keep = keep
        self.parallel = parallel

    def choose(self, resume: bool | str | os.PathLike) -> Path | None:
        """The checkpoint to resume from, decided on rank 0 and checked by every rank.

        Every rank must read the *same* checkpoint: if each looked at ``out_dir`` on its own, a
        rank on another machine (or one looking a moment earlier) could pick another step and
        the ranks would wait for each other forever. Raises on every rank when one of them
        cannot see rank 0's choice.
        """
        if not resume:
            return None
        if isinstance(resume, bool):
            if self.out_dir is None:
                raise FileNotFoundError("resume=True needs out_dir: the folder with the checkpoints")
            found = latest_checkpoint(self.out_dir)
            name = self.parallel.broadcast_object(found.name if found is not None else None)
            if name is None:
                raise FileNotFoundError(f"resume=True but there is no checkpoint in out_dir={str(self.out_dir)!r}")
            path = self.out_dir / name
        else:
            path = Path(self.parallel.broadcast_object(str(resume)))
        missing = [r for r, ok in enumerate(self.parallel.gather_object(path.exists())) if not ok]
        if missing:
            raise FileNotFoundError(
                f"rank 0 resumes from {path.name} but rank(s) {missing} cannot see {path}: every rank must "
                "read the same checkpoint; put the run directory on storage that every node shares"
            )
        return path

    def load(self, path: Path, state: TrainState, check: Any = None) -> dict[str, Any]:
        """Restore ``state`` from ``path``; return the checkpoint's other entries (config, extra).

        ``check(saved_config)`` runs before anything is restored (to refuse changed settings).
        """
        if path.is_dir() != self.parallel.sharded:
            raise ValueError(f"{path} was written by a {'sharded' if path.is_dir() else 'replicated'} model but "
                             f"this run is {self.parallel.name}: resume it with the strategy that wrote it")
        meta = load_checkpoint(path / DCP_STATE_FILE if path.is_dir() else path, map_location="cpu")
        if check is not None:
            check(meta.get("config", {}))
        if path.is_dir():
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model, optimizer = get_state_dict(state.model, state.optimizer)  # the shapes to load into
            shards = {"model": model, "optimizer": optimizer}
            dcp.load(shards, checkpoint_id=str(path), process_group=self.parallel.group)
            meta.update(shards)
        state.load_state_dict(meta)
        return {k: v for k, v in meta.items() if k not in ("model", "optimizer", "scheduler", "scaler",
                                                            "rng", "data", "step")}

    def save(self, state: TrainState, **meta: Any) -> Path:
        """Write ``state`` (plus plain ``meta`` such as the config) for ``state.step``; every rank calls it."""
        assert self.out_dir is not None
        full = {**state.state_dict(), **meta}
        if self.parallel.sharded:
            path = self._save_sharded(full, state.step)
        else:
            path = checkpoint_path(self.out_dir, state.step)
            if self.parallel.is_writer:
                save_checkpoint(path, **full)
        if self.parallel.is_writer:
            prune_checkpoints(self.out_dir, self.keep)
        self.parallel.barrier()  # no rank runs ahead of a checkpoint that is still being written
        return path

    def _save_sharded(self, full: dict[str, Any], step: int) -> Path:
        import torch.distributed.checkpoint as dcp

        path = checkpoint_path(self.out_dir, step).with_suffix(".dcp")
        tmp = path.parent / f".{path.name}.tmp"
        if self.parallel.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a writer killed mid-save
            tmp.mkdir(parents=True)
        self.parallel.barrier()
        dcp.save({"model": full.pop("model"), "optimizer": full.pop("optimizer")}, checkpoint_id=str(tmp),
                 process_group=self.parallel.group)
        if self.parallel.is_writer:
            save_checkpoint(tmp / DCP_STATE_FILE, **full)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)  # atomic: the directory appears complete or not at all
        return path
