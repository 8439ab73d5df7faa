"""Instruments for training stability: what to watch before, during and after a loss spike.

A loss spike is rarely the first sign. These monitors record, per logged step, the quantities
that grow before it does (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
training instabilities"; Dehghani et al. 2023 on attention-logit growth):

* :class:`AttentionLogitMonitor`: the largest attention score ``|q . k| * scale`` per layer
  (attention-logit growth: softmax saturates to one-hot, gradients vanish, then spike);
* :class:`OutputLogitMonitor`: the largest output logit and the mean ``logsumexp`` (output-logit
  divergence, what z-loss and soft-capping guard);
* :class:`UpdateRatioLogger`: ``||w_t - w_{t-1}|| / ||w_{t-1}||`` per parameter group (the
  update-to-weight ratio; around 1e-3 is healthy for Adam, 1e-2 and up precedes trouble);
* :func:`count_spikes`: how many steps' loss jumps above a running reference;
* :func:`final_loss`: the mean of the last few logged losses, the number runs are compared by.

Each monitor is a logger for :func:`course_lib.training.train` (pass it in ``loggers``): at every
logged step it stores its values in ``records[step]``. The two logit monitors are also context
managers that hook into a :class:`course_lib.model.GPT` for the duration of training.
"""

from __future__ import annotations

import abc
import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from course_lib.model import GPT, CausalSelfAttention


class _Recorder(abc.ABC):
    """Logger protocol: ``log(metrics, step)`` stores :meth:`values` in ``records[step]``."""

    def __init__(self) -> None:
        self.records: dict[int, dict[str, float]] = {}

    @abc.abstractmethod
    def values(self) -> dict[str, float]:
        """What the monitor measures now."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.records[step] = self.values()

    def series(self, key: str) -> list[float]:
        """``key``'s value at every recorded step, in step order."""
        return [self.records[s][key] for s in sorted(self.records)]


class AttentionLogitMonitor(_Recorder):
    """Largest pre-softmax attention score of each block, measured on the last forward pass.

    Use as a context manager around training; ``values()`` gives ``{"attn_logit/<i>": max}``.
    The scores are recomputed from the attention's input (SDPA never materialises them), so it
    costs one extra score matmul per block per forward.
    """

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model
        self.latest: dict[str, float] = {}
        self._hooks: list[Any] = []

    def _hook(self, index: int):
        def pre_hook(attn: CausalSelfAttention, args: tuple) -> None:
            x = args[0].detach()
            with torch.no_grad():
                B, T, _ = x.shape
                q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
                k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
                if attn.q_norm is not None:
                    q, k = attn.q_norm(q), attn.k_norm(k)
                scale = attn.scale if attn.scale is not None else 1.0 / math.sqrt(attn.head_dim)
                scores = (q @ k.transpose(-2, -1)).float() * scale
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                self.latest[f"attn_logit/{index}"] = scores.masked_fill(~causal, 0).abs().max().item()
        return pre_hook

    def __enter__(self) -> AttentionLogitMonitor:
        self._hooks = [block.attn.register_forward_pre_hook(self._hook(i)) for i, block in enumerate(self.model.blocks)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def values(self) -> dict[str, float]:
        return dict(self.latest)


class OutputLogitMonitor(AttentionLogitMonitor):
    """Largest |output logit| and mean logsumexp of the last forward pass."""

    def __enter__(self) -> OutputLogitMonitor:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            logits = output.logits.detach().float()
            self.latest = {"logit_max": logits.abs().max().item(),
                           "logsumexp": logits.logsumexp(-1).mean().item()}
        self._hooks = [self.model.register_forward_hook(hook)]
        return self


class UpdateRatioLogger(_Recorder):
    """Records ``||w_t - w_prev|| / ||w_prev||`` over all 2-D weights, at every logged step.

    ``train`` calls ``log`` after the optimizer step, so the ratio covers the updates since the
    previous logged step (one step when ``log_every=1``). Build it just before training.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.params = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        self.previous = [p.detach().clone() for p in self.params]

    def values(self) -> dict[str, float]:
        with torch.no_grad():
            delta = torch.stack([(p - q).norm() for p, q in zip(self.params, self.previous, strict=True)]).norm()
            size = torch.stack([q.norm() for q in self.previous]).norm()
            for p, q in zip(self.params, self.previous, strict=True):
                q.copy_(p)
        return {"update_ratio": (delta / size).item()}


def count_spikes(losses: Sequence[float], factor: float = 1.3, window: int = 10) -> int:
    """Steps whose loss exceeds ``factor`` times the minimum of the previous ``window`` losses.

    A non-finite loss counts as a spike. Early steps (fewer than ``window`` before them) are
    not judged: the loss falls fastest there.
    """
    if factor <= 1 or window < 1:
        raise ValueError(f"need factor > 1 and window >= 1, got {factor}, {window}")
    spikes = 0
    for t in range(window, len(losses)):
        reference = min(losses[t - window:t])
        if not math.isfinite(losses[t]) or losses[t] > factor * reference:
            spikes += 1
    return spikes


def final_loss(losses: Sequence[float], last: int = 10) -> float:
    """Mean of the last ``last`` logged losses: one noisy batch does not decide a comparison."""
    if not losses or last < 1:
        raise ValueError(f"need at least one loss and last >= 1, got {len(losses)} losses, last={last}")
    return statistics.fmean(losses[-last:])
