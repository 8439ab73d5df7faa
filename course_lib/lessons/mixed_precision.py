"""Lesson 04's demonstrations: fp16 gradients underflowing, loss scaling rescuing them, an overflowing step skipped.

Deterministic: the gradients are constructed, not sampled, so the lesson and the tests see the
same numbers on every machine. The mechanism (autocast, the scaler each precision needs) is
:mod:`course_lib.precision`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def gradient_magnitudes(n: int = 61, low: float = 1e-12, high: float = 1e-2) -> torch.Tensor:
    """``n`` gradient magnitudes spaced evenly in log scale from ``low`` to ``high`` (fp32)."""
    return torch.logspace(torch.log10(torch.tensor(low)).item(), torch.log10(torch.tensor(high)).item(), n)


def _constructed_grads(target: torch.Tensor, dtype: torch.dtype, loss_scale: float | None) -> torch.Tensor:
    """Backpropagate ``target`` as the gradient of a linear layer run under autocast to ``dtype``.

    ``W`` (n x 1) is an fp32 parameter and ``y = x W^T`` with ``x = 1`` runs in ``dtype``; the loss
    ``sum(y * target)`` has ``dL/dy = target``, which backward casts to ``dtype`` before the matmul:
    so ``W.grad`` is exactly ``target`` as ``dtype``'s backward sees it. With ``loss_scale`` the
    loss goes through a ``GradScaler`` (scale, backward, unscale) as in real training.
    """
    W = torch.nn.Parameter(torch.ones(target.numel(), 1))
    x = torch.ones(1, 1)
    with torch.autocast("cpu", dtype=dtype):
        y = torch.nn.functional.linear(x, W)
    loss = (y.float() * target).sum()
    if loss_scale is None:
        loss.backward()
        return W.grad.flatten()
    scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale)
    opt = torch.optim.SGD([W], lr=0.0)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # divides the gradients by the scale, in fp32
    return W.grad.flatten()


@dataclass
class UnderflowDemo:
    """Gradients of known size (``reference``) as they arrive in fp16 without and with loss scaling, and in bf16."""

    reference: torch.Tensor
    fp16: torch.Tensor
    fp16_scaled: torch.Tensor
    bf16: torch.Tensor
    loss_scale: float

    @staticmethod
    def _zeroed(grads: torch.Tensor, ref: torch.Tensor) -> float:
        return float(((grads == 0) & (ref != 0)).float().mean())

    @property
    def zeroed(self) -> dict[str, float]:
        """Fraction of the (all non-zero) gradients that arrived as exactly zero."""
        return {k: self._zeroed(getattr(self, k), self.reference) for k in ("fp16", "fp16_scaled", "bf16")}


def underflow_demo(reference: torch.Tensor | None = None, loss_scale: float = 2.0**16) -> UnderflowDemo:
    """Show fp16 gradients underflowing to zero, rescued by loss scaling; bf16 needs no scaling.

    fp16's smallest positive (subnormal) number is 2**-24 (about 6e-8): a gradient below half of
    that rounds to exactly zero in the backward pass and its update is lost. Multiplying the loss
    by ``loss_scale`` multiplies every gradient by it (chain rule), lifting them into fp16's range;
    ``GradScaler.unscale_`` divides them back in fp32. bf16 has fp32's exponent range.
    """
    ref = gradient_magnitudes() if reference is None else reference.float()
    return UnderflowDemo(
        reference=ref,
        fp16=_constructed_grads(ref, torch.float16, None),
        fp16_scaled=_constructed_grads(ref, torch.float16, loss_scale),
        bf16=_constructed_grads(ref, torch.bfloat16, None),
        loss_scale=loss_scale,
    )


@dataclass
class OverflowDemo:
    """What ``GradScaler`` did on an overflowing step and on the normal step after it."""

    scale_before: float
    scale_after_overflow: float
    skipped: bool  # the weights did not change on the overflowing step
    scale_after_normal: float
    updated_after: bool  # the next, finite step did update the weights


def overflow_demo(init_scale: float = 2.0**16, big_grad: float = 1.0, small_grad: float = 1e-6) -> OverflowDemo:
    """An fp16 step whose scaled gradient overflows is skipped, and the scale is halved.

    The scaled gradient ``big_grad * init_scale`` exceeds fp16's largest number (65504) and
    becomes ``inf``: ``scaler.step`` sees the inf, skips ``optimizer.step()`` and ``update()``
    multiplies the scale by ``backoff_factor`` (0.5). The next step (``small_grad``) is finite
    and updates the weights normally.
    """
    W = torch.nn.Parameter(torch.ones(4, 1))
    opt = torch.optim.SGD([W], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)

    def step(grad: float) -> bool:
        before = W.detach().clone()
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            y = torch.nn.functional.linear(torch.ones(1, 1), W)
        scaler.scale(y.float().sum() * grad).backward()
        scaler.step(opt)
        scaler.update()
        return not torch.equal(W.detach(), before)

    scale_before = scaler.get_scale()
    changed = step(big_grad)
    scale_after_overflow = scaler.get_scale()
    updated = step(small_grad)
    return OverflowDemo(
        scale_before=scale_before, scale_after_overflow=scale_after_overflow, skipped=not changed,
        scale_after_normal=scaler.get_scale(), updated_after=updated,
    )

