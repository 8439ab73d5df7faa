"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021), done right.

A frozen ``W`` (out x in) gets a trainable update ``(alpha / rank) * B @ A`` with ``A`` (rank x in)
and ``B`` (out x rank)::

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T

* ``B`` starts at **zero**, so the wrapped model computes exactly what the base model did until
  training moves ``B`` (the tutorial initialised both randomly: the model changed before any
  training). ``A`` starts as PEFT's (Kaiming-uniform), so the two agree bit for bit.
* The base weights are **frozen** (``requires_grad=False``): autograd neither computes nor stores
  their gradients, and the optimizer holds no state for them.
* :func:`apply_lora` first collects the targets, then replaces them (never while iterating
  ``named_modules()``), and handles modules sitting directly on the model. It refuses a target
  whose weight is tied to another module's (the GPT's ``lm_head`` shares ``wte.weight``):
  merging would rewrite the embedding too. PEFT only warns about this (and its merge does
  rewrite the embedding); the fix it recommends, untying with a copy, is in the error message.
* Whether an adapter is merged is part of the module's ``state_dict`` (its ``_extra_state``), so
  a model saved after :func:`merge_lora` loads back merged: the update is applied once, not twice.
* A merged layer refuses ``backward()`` with a message saying what to do: its forward no longer
  involves ``A`` and ``B``, so they would get no gradient. :func:`unmerge_lora` to keep training;
  :func:`merge_and_unload` for a plain model (``nn.Linear`` layers, the base's state-dict keys).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

_MERGED_BACKWARD = (
    "backward() through a merged LoRA layer: merge_lora folded (alpha/rank) * B @ A into the frozen base "
    "weight, so this forward does not involve lora_A and lora_B and they would get no gradient. Call "
    "unmerge_lora(model) before training the adapters (merge again afterwards), or merge_and_unload(model) "
    "for a plain model to fine-tune fully"
)


class _RefuseBackward(torch.autograd.Function):
    """Identity in the forward; its backward raises: marks the output of a merged layer."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError(_MERGED_BACKWARD)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update scaled by ``alpha / rank``.

    Attributes:
        base: the wrapped linear layer (its parameters are frozen).
        lora_A: (rank, in_features), Kaiming-uniform like PEFT.
        lora_B: (out_features, rank), zeros.
        scaling: ``alpha / rank``.
        merged: whether the update is currently folded into ``base.weight``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive (the update is scaled by alpha/rank), got {alpha}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT do
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B @ A`` (out x in) that merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            trainable = [p for p in (self.lora_A, self.lora_B) if p.requires_grad]
            if trainable and torch.is_grad_enabled():
                y = _RefuseBackward.apply(y, trainable[0])  # backward() then says why it cannot train
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base.weight``: one matmul per layer at inference, no extra latency."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (to keep training the adapter)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def get_extra_state(self) -> dict[str, bool]:
        """Saved in ``state_dict`` next to the weights: a merged base weight must load back as merged."""
        return {"merged": self.merged}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.merged = bool(state["merged"])

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: Iterable[str] = ("q_proj", "v_proj"),
    dropout: float = 0.0,
) -> nn.Module:
    """Wrap every ``nn.Linear`` whose name (or last name component) is in ``target_modules``.

    Works in place and returns ``model``, with only the LoRA parameters trainable. Targets are
    collected first and replaced afterwards, and a target that sits directly on ``model`` (a
    name without a dot) is handled: its parent is the model itself.
    """
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    found = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    _refuse_tied(model, found)
    if "" in targets:
        raise ValueError("the model itself is a target: wrap it directly with LoRALinear(model, rank, alpha)")
    if not found:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no module matches target_modules={list(targets)}; linear layers here: {linears}")
    for name, module in found:
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter; call apply_lora once")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target {name} is a {type(module).__name__}; LoRA here wraps nn.Linear only")
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
    mark_only_lora_trainable(model)
    return model


def _refuse_tied(model: nn.Module, found: list[tuple[str, nn.Module]]) -> None:
    """Refuse a target whose parameters another module also uses (weight tying)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, module in found:
        for p_name, p in module.named_parameters(recurse=False):
            others = [o for o in owners.get(id(p), []) if o != f"{name}.{p_name}"]
            if others:
                raise ValueError(
                    f"{name}.{p_name} is tied to {others[0]}: an adapter on {name} would change {others[0]} too "
                    f"when merged (PEFT warns about this and its merge does it). Leave {name} out of "
                    f"target_modules, or untie it first, as PEFT recommends: "
                    f"model.{name}.{p_name} = nn.Parameter(model.{name}.{p_name}.detach().clone())"
                )


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """All :class:`LoRALinear` modules in ``model``."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter except the LoRA ``A`` and ``B`` matrices."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place); :func:`unmerge_lora` undoes it."""
    for layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of its base weight (in place)."""
    for layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the base ``nn.Linear`` back in its place (in place; returns the model).

    The result is a plain model with the base model's ``state_dict`` keys, computing what the
    adapted model computed, as PEFT's ``merge_and_unload()``. Parameters keep their
    ``requires_grad`` (PEFT's too): every one is frozen after LoRA training; unfreeze them to
    fine-tune the merged model fully.
    """
    if isinstance(model, LoRALinear):
        model.merge()
        return model.base
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone (``...lora_A``/``...lora_B``): a few kB to save instead of the model."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load adapter weights saved by :func:`lora_state_dict` into a model with the same adapters.

    Raises ``KeyError`` naming missing or unexpected keys (apply LoRA with the same targets first).
    """
    expected = set(lora_state_dict(model))
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise KeyError(
            f"adapter keys do not match (missing {missing[:4]}, unexpected {unexpected[:4]}): apply_lora "
            "with the same rank and target_modules before loading"
        )
    if any(layer.merged for layer in lora_layers(model)):
        raise RuntimeError("unmerge_lora(model) before loading new adapter weights")
    model.load_state_dict(state_dict, strict=False)
    return model


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of distinct parameters with ``requires_grad`` (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)
