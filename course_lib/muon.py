"""Muon: momentum whose update is orthogonalised by Newton-Schulz iterations (Jordan et al., 2024).

For a weight matrix, Adam's update is dominated by a few directions. Muon replaces the
momentum matrix ``M = U S V^T`` by (approximately) ``U V^T``: every singular direction moves
by the same amount. Computing ``U V^T`` by SVD is slow on accelerators, so Muon runs a few
steps of the odd polynomial iteration ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` on the
normalised matrix, which pushes every singular value towards 1. The quintic coefficients
``(3.4445, -4.7750, 2.0315)`` are tuned to converge fast, at the price of leaving singular
values in roughly [0.7, 1.2] rather than exactly 1; the cubic ``(1.5, -0.5, 0)`` converges to
exactly ``U V^T`` but slowly.

Muon is only for 2-D hidden matrices: embeddings, the output head, biases and norm gains keep
AdamW (:func:`muon_param_groups` splits them).
"""

from __future__ import annotations

import torch
import torch.nn as nn

QUINTIC = (3.4445, -4.7750, 2.0315)
CUBIC = (1.5, -0.5, 0.0)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = QUINTIC,
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a 2-D matrix: ``U S V^T -> U V^T``.

    The matrix is scaled by its Frobenius norm first (so every singular value is <= 1, inside
    the iteration's basin), and transposed so that ``X X^T`` is the smaller Gram matrix.
    """
    if G.dim() != 2:
        raise ValueError(f"newton_schulz orthogonalises a matrix, got a tensor of shape {tuple(G.shape)}")
    a, b, c = coefficients
    X = G / (G.norm() + eps)
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for the hidden matrices and AdamW for everything else, in one optimizer.

    Parameter groups with ``use_muon=True`` (2-D only) get
    ``p <- p * (1 - lr * weight_decay) - lr * scale * NS(nesterov momentum)``, where
    ``scale = max(1, rows / cols) ** 0.5`` keeps the update's RMS similar across shapes. Other
    groups get the AdamW update (``betas``, ``eps``, decoupled ``weight_decay``), equal to
    ``torch.optim.AdamW``'s. Build the groups with :func:`muon_param_groups`. Being one
    ``Optimizer``, it works with learning-rate schedulers and checkpoints like any other.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps, betas=betas, eps=eps, use_muon=True))
        for group in self.param_groups:
            for p in group["params"]:
                if group["use_muon"] and p.dim() != 2:
                    raise ValueError(
                        f"Muon updates 2-D weight matrices only, got a parameter of shape {tuple(p.shape)}: "
                        "put embeddings, biases and norms in a group with use_muon=False (see muon_param_groups)"
                    )

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim's signature
        loss = None if closure is None else closure()
        for group in self.param_groups:
            update = self._muon_update if group["use_muon"] else self._adamw_update
            for p in group["params"]:
                if p.grad is not None:
                    update(p, group, self.state[p])
        return loss

    @staticmethod
    def _muon_update(p: torch.Tensor, group: dict, state: dict) -> None:
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.mul_(group["momentum"]).add_(p.grad)
        direction = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(newton_schulz(direction, group["ns_steps"]), alpha=-group["lr"] * scale)

    @staticmethod
    def _adamw_update(p: torch.Tensor, group: dict, state: dict) -> None:
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))


def muon_param_groups(model: nn.Module, lr: float = 0.02, adam_lr: float = 3e-3,
                      weight_decay: float = 0.0) -> list[dict]:
    """Groups for :class:`Muon`: hidden 2-D matrices on Muon, everything else on AdamW.

    Embeddings and the (tied) output head are 2-D but are not hidden layers: Muon's authors keep
    them on AdamW, as they do biases and norm gains (which are never decayed).
    """
    hidden, embeddings, vectors = [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() == 2 and not name.startswith(("wte", "wpe", "lm_head")):
            hidden.append(p)
        else:
            (embeddings if p.dim() >= 2 else vectors).append(p)
    groups = [
        {"params": hidden, "lr": lr, "use_muon": True, "weight_decay": weight_decay},
        {"params": embeddings, "lr": adam_lr, "use_muon": False, "weight_decay": weight_decay},
        {"params": vectors, "lr": adam_lr, "use_muon": False, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
