"""Watching a training run: loggers, gradient norms, throughput and MFU.

Loggers share one tiny interface (:class:`Logger`): ``log(metrics, step)`` and ``close()``.

* :class:`JSONLLogger` always works: one JSON object per line, flushed every step, appended to
  when a run resumes. It is what the CLI writes as ``metrics.jsonl``. Every line is strict JSON:
  a value that is not finite (a diverged loss) is written as ``null`` and named, with its kind,
  in a ``"nonfinite"`` object: ``{"step": 7, "loss": null, "nonfinite": {"loss": "nan"}}``
  (kinds ``"nan"``, ``"inf"``, ``"-inf"``). :func:`read_jsonl` turns them back into floats.
* :class:`WandbLogger` writes a Weights & Biases run **offline** unless you ask for ``"online"``;
  offline and disabled modes need no account, no key and no network.
* :class:`LivePlot` redraws a matplotlib figure in place in a notebook (throttled).
* :class:`MultiLogger` fans one call out to several loggers.

Measurements: :func:`grad_norms` (global and per block, with one host sync however many
parameters the model has), :class:`Throughput` (tokens per second), :func:`mfu` (model FLOPs
utilisation) with :func:`measure_matmul_flops` and :func:`datasheet_peak_flops` for its peak.
"""

from __future__ import annotations

import io
import json
import math
import netrc
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

WANDB_MODES = ("offline", "online", "disabled")
NONFINITE_KEY = "nonfinite"  # metrics.jsonl: {name: "nan" | "inf" | "-inf"} for the values written as null

# Dense (no sparsity) tensor-core peak FLOP/s from the vendors' datasheets (SXM parts), keyed by
# a substring of the GPU name; fp32 means plain fp32 (no TF32).
DATASHEET_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}


@runtime_checkable
class Logger(Protocol):
    """Anything with ``log(metrics, step)`` and ``close()`` can receive training metrics."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def _plain(value: Any) -> Any:
    """Turn tensors and numpy scalars into Python numbers so they serialise as JSON."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"only scalar tensors can be logged, got shape {tuple(value.shape)}")
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


class JSONLLogger:
    """Append one JSON object per logged step to ``path`` (``{"step": ..., **metrics}``).

    The file is opened in append mode, so a resumed run continues the same file, and it is
    flushed after every line, so a crash loses at most the line being written. Non-finite
    values are written as ``null`` plus ``"nonfinite": {name: "nan" | "inf" | "-inf"}``, so
    every line parses as strict JSON (``json.dumps`` would write ``NaN``/``Infinity``, which
    ``jq``, JavaScript and most JSON parsers reject).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._file.closed:
            raise RuntimeError(f"JSONLLogger({self.path}) is closed; create a new logger to keep logging")
        if NONFINITE_KEY in metrics:
            raise ValueError(f"{NONFINITE_KEY!r} is reserved for the names of non-finite values; rename that metric")
        record: dict[str, Any] = {"step": int(step)}
        nonfinite: dict[str, str] = {}
        for name, value in metrics.items():
            value = _plain(value)
            if isinstance(value, float) and not math.isfinite(value):
                nonfinite[name] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
                value = None
            record[name] = value
        if nonfinite:
            record[NONFINITE_KEY] = nonfinite
        try:
            line = json.dumps(record, allow_nan=False)
        except ValueError as e:
            raise ValueError(f"metrics at step {step} hold a non-finite number inside a list or dict: "
                             f"log scalars ({e})") from None
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JSONLLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a file written by :class:`JSONLLogger` back into a list of dicts.

    Values recorded as non-finite come back as ``float("nan")``, ``inf`` or ``-inf`` (and the
    ``"nonfinite"`` entry is dropped), so the records equal what was logged.
    """
    with Path(path).open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for record in records:
        for name, kind in record.pop(NONFINITE_KEY, {}).items():
            record[name] = float(kind)
    return records


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger:
    """Log to Weights & Biases; offline by default, so it never needs an account or network.

    Args:
        project: the W&B project name.
        mode: ``"offline"`` (default: the run is written under ``dir``/wandb and can be uploaded
            later with ``wandb sync``), ``"online"`` (only when you ask; needs ``wandb login`` or
            ``WANDB_API_KEY`` and fails fast without them instead of waiting for a prompt), or
            ``"disabled"`` (a no-op run, for tests).
        config: hyper-parameters stored with the run.
        dir: where the ``wandb/`` folder goes (default: the current directory).
        name: optional run name.
    """

    def __init__(
        self,
        project: str = "llm-course",
        mode: str = "offline",
        config: Mapping[str, Any] | None = None,
        dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
        if mode == "online" and not _has_wandb_credentials():
            raise RuntimeError(
                "wandb mode 'online' needs credentials: run `wandb login` or set WANDB_API_KEY, "
                "or use mode='offline' (sync later with `wandb sync`)"
            )
        import wandb  # imported here: it is slow to import and optional for the course

        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.run = wandb.init(
            project=project,
            mode=mode,
            config=dict(config or {}),
            dir=None if dir is None else str(dir),
            name=name,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )

    @property
    def run_dir(self) -> Path | None:
        """The folder the offline run is written to (``None`` when disabled)."""
        return None if self.mode == "disabled" else Path(self.run.dir).parent

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.run.log({k: _plain(v) for k, v in metrics.items()}, step=int(step))

    def close(self) -> None:
        self.run.finish()


class LivePlot:
    """A matplotlib figure, one panel per metric, redrawn in place in a notebook.

    Redraws at most every ``min_interval_s`` seconds (drawing is slow; training should not
    wait for it) and once more on :meth:`close`. Outside IPython it only records the history.
    """

    def __init__(self, metrics: Sequence[str] = ("loss",), min_interval_s: float = 1.0) -> None:
        from matplotlib.figure import Figure

        if isinstance(metrics, str):
            metrics = (metrics,)
        if not metrics:
            raise ValueError("LivePlot needs at least one metric name, e.g. metrics=('loss',)")
        self.metrics = tuple(metrics)
        self.min_interval_s = min_interval_s
        self.history: dict[str, tuple[list[int], list[float]]] = {m: ([], []) for m in self.metrics}
        # A Figure not managed by pyplot: the notebook does not show it again at the cell's end.
        self.figure = Figure(figsize=(4 * len(self.metrics), 3), layout="constrained")
        self.axes = self.figure.subplots(1, len(self.metrics), squeeze=False)[0]
        self._lines = {}
        for ax, m in zip(self.axes, self.metrics, strict=True):
            (self._lines[m],) = ax.plot([], [])
            ax.set_title(m)
            ax.set_xlabel("step")
        self._last_draw = -math.inf
        self._handle = None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for m in self.metrics:
            if m in metrics:
                steps, values = self.history[m]
                steps.append(int(step))
                values.append(float(_plain(metrics[m])))
        if time.perf_counter() - self._last_draw >= self.min_interval_s:
            self.draw()

    def draw(self) -> None:
        """Update the lines and (in IPython) show or refresh the figure."""
        for ax, m in zip(self.axes, self.metrics, strict=True):
            self._lines[m].set_data(*self.history[m])
            ax.relim()
            ax.autoscale_view()
        self._last_draw = time.perf_counter()
        try:
            from IPython import get_ipython
            from IPython.display import Image, display
        except ImportError:
            return
        if get_ipython() is None:
            return
        # Shown as a PNG made here: a bare Figure has no notebook formatter unless
        # `%matplotlib inline` ran, and would show up as the text "<Figure ...>".
        image = Image(data=self.png(), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)

    def png(self) -> bytes:
        """The figure as PNG bytes (what the notebook shows)."""
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=80)
        return buffer.getvalue()

    def close(self) -> None:
        self.draw()


class MultiLogger:
    """Send every ``log``/``close`` call to each of ``loggers``."""

    def __init__(self, loggers: Iterable[Logger]) -> None:
        self.loggers = list(loggers)
        for lg in self.loggers:
            if not isinstance(lg, Logger):
                raise TypeError(f"{lg!r} is not a logger: it needs log(metrics, step) and close()")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


class LayerNormsOnJump:
    """A logger that keeps the per-layer gradient norms of every step where the global norm jumps.

    Sampling per-layer norms every N steps misses a spike between two samples. This logger
    instead computes each parameter's squared gradient norm on the device during every backward
    pass (a ``register_post_accumulate_grad_hook`` per parameter: nothing crosses to the host),
    and when a step's logged ``grad_norm`` exceeds ``factor`` times the median of the previous
    ``window`` steps, it transfers that step's per-layer norms (one host sync) into
    ``records[step]`` as ``{"grad_norm/<group>": norm}`` (groups as in :func:`grad_norms`).
    The norms are the ones before clipping, like the logged ``grad_norm``; with gradient
    accumulation, of the accumulated gradient. Pass it to ``train(loggers=[...])``.
    """

    def __init__(self, model: nn.Module, factor: float = 2.0, window: int = 10) -> None:
        if factor <= 1 or window < 1:
            raise ValueError(f"need factor > 1 and window >= 1, got {factor} and {window}")
        self.factor, self.window = factor, window
        self.records: dict[int, dict[str, float]] = {}
        self._history: deque[float] = deque(maxlen=window)
        self._squares: dict[str, torch.Tensor] = {}  # parameter name -> its last squared gradient norm
        self._groups = {name: _group_name(name) for name, p in model.named_parameters() if p.requires_grad}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(name))
                         for name, p in model.named_parameters() if p.requires_grad]

    def _hook(self, name: str) -> Any:
        def record(p: torch.Tensor) -> None:
            self._squares[name] = p.grad.detach().float().pow(2).sum()

        return record

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        norm = metrics.get("grad_norm")
        if norm is None:
            return
        history = sorted(self._history)
        if len(history) >= 3 and norm > self.factor * history[len(history) // 2]:
            groups: dict[str, list[torch.Tensor]] = {}
            for name, square in self._squares.items():
                groups.setdefault(self._groups[name], []).append(square)
            names = sorted(groups)
            values = torch.stack([torch.stack(groups[g]).sum().sqrt() for g in names]).tolist()  # one sync
            self.records[int(step)] = {f"grad_norm/{g}": v for g, v in zip(names, values, strict=True)}
        self._history.append(float(norm))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _group_name(param_name: str) -> str:
    """``blocks.3.attn.q_proj.weight`` -> ``blocks.3``; ``wte.weight`` -> ``wte``."""
    parts = param_name.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0] if len(parts) > 1 else param_name


@torch.no_grad()
def grad_norms(model: nn.Module, per_layer: bool = False) -> dict[str, float]:
    """L2 norms of the gradients: ``{"grad_norm": global}`` plus ``"grad_norm/<group>"`` per block.

    Every norm is computed on the gradients' device and the results cross to the host in a
    **single** transfer, so logging costs one sync per step whatever the number of parameters
    (logging ``p.grad.norm().item()`` per parameter costs one sync each: Errata 12). Groups are
    top-level modules, with ``ModuleList`` entries split by index (``blocks.0``, ``blocks.1``...).
    The global norm equals the total norm ``torch.nn.utils.clip_grad_norm_`` returns, and the
    group norms combine to it: ``sqrt(sum(g**2)) == global``.
    """
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        raise ValueError("no parameter has a gradient: call loss.backward() before grad_norms(model)")
    device = named[0][1].device
    norms = torch.stack([torch.linalg.vector_norm(g.float(), 2).to(device) for _, g in named])
    names = ["grad_norm"]
    values = [torch.linalg.vector_norm(norms, 2)]
    if per_layer:
        groups: dict[str, list[int]] = {}
        for i, (n, _) in enumerate(named):
            groups.setdefault(_group_name(n), []).append(i)
        for g, idx in groups.items():
            names.append(f"grad_norm/{g}")
            values.append(torch.linalg.vector_norm(norms[idx], 2))
    return dict(zip(names, torch.stack(values).tolist(), strict=True))  # the one host sync


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (``tokens_per_s * flops_per_token``) over the peak.

    ``flops_per_token`` is the *model's* training FLOPs (``GPT.flops_per_token()``, about 6N),
    not counting recomputation, so checkpointing lowers MFU even when the hardware is as busy.
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    if tokens_per_s < 0 or flops_per_token < 0:
        raise ValueError("tokens_per_s and flops_per_token must be non-negative")
    return tokens_per_s * flops_per_token / peak_flops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Throughput:
    """Tokens-per-second meter over the last ``window`` steps.

    Call :meth:`update` once per optimizer step with the number of tokens that step processed;
    it returns the rate over the window. On a GPU pass ``device`` so the clock is read after the
    queued kernels have finished (otherwise you time the launch, not the work).
    """

    def __init__(self, window: int = 20, device: torch.device | str | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._steps: deque[tuple[float, int]] = deque(maxlen=window)
        self.total_tokens = 0
        self.reset()

    def reset(self) -> None:
        """Start timing from now (call after warm-up steps you do not want to count)."""
        _sync(self.device)
        self._steps.clear()
        self._last = time.perf_counter()

    def update(self, tokens: int) -> float:
        """Record a step of ``tokens`` tokens finished now; return tokens/s over the window."""
        _sync(self.device)
        now = time.perf_counter()
        self._steps.append((now - self._last, int(tokens)))
        self._last = now
        self.total_tokens += int(tokens)
        return self.tokens_per_s

    @property
    def tokens_per_s(self) -> float:
        """Rate over the window (0.0 before the first step)."""
        seconds = sum(s for s, _ in self._steps)
        return sum(t for _, t in self._steps) / seconds if seconds > 0 else 0.0


def measure_matmul_flops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    n: int | None = None,
    reps: int = 5,
) -> float:
    """Measured peak FLOP/s of an ``n x n`` matrix multiply on ``device`` (best of ``reps``).

    This is the machine's practical ceiling for the dense maths of training, so an MFU against it
    shows how much of *this* machine a model uses (the datasheet number may be out of reach).
    """
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, caches)
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def datasheet_peak_flops(device: torch.device | str, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s from the datasheet of this CUDA GPU, or ``None`` if unknown / not CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DATASHEET_PEAK_FLOPS.items():
        if key in name:
            return peaks.get(precision)
    return None
