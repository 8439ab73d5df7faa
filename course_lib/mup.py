"""muP (maximal update parametrisation): hyperparameters tuned on a narrow model transfer to wide ones.

Under the standard parametrisation (SP) the best Adam learning rate shrinks as the model widens,
so a sweep on a small model says little about a big one. muP (Yang et al., "Tensor Programs V",
2022) rescales three things with the width multiplier ``m = n_embd / base_width`` so that every
layer's update changes its output by the same amount at every width:

* hidden matrices (q/k/v/o projections, the MLP): init variance ``1/m`` and Adam learning rate
  ``lr / m``;
* embeddings, biases and norm gains: init and learning rate unchanged;
* the output logits are multiplied by ``1/m``, and attention scores use ``1/head_dim``.

The model half lives in :class:`course_lib.model.GPTConfig` (``mup_base_width``); this module
holds the optimizer half (:func:`mup_param_groups`) and the *coordinate check*
(:func:`coordinate_check`): train a few steps at several widths and check that activation
sizes do not grow with width. It is the standard test that a muP implementation is right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from course_lib.model import GPT, GPTConfig

HIDDEN_MATRICES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "fc_in.weight",
                   "fc_out.weight")


def mup_param_groups(model: GPT, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups with muP's per-layer learning rates.

    Hidden matrices get ``lr / width_mult`` (decayed), embeddings ``lr`` (decayed: the tied
    matrix is 2-D), biases and norm gains ``lr`` (not decayed). With a standard model
    (``mup_base_width=None``) this is the usual two-group split at one learning rate.
    """
    m = model.config.width_mult
    hidden, matrices, vectors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(HIDDEN_MATRICES):
            hidden.append(p)
        elif p.dim() >= 2:
            matrices.append(p)
        else:
            vectors.append(p)
    groups = [
        {"params": hidden, "lr": lr / m, "weight_decay": weight_decay},
        {"params": matrices, "lr": lr, "weight_decay": weight_decay},
        {"params": vectors, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _activation_sizes(model: GPT, input_ids: torch.Tensor) -> dict[str, float]:
    """Mean |x| of the embedding output, each block's output and the logits."""
    sizes: dict[str, float] = {}
    hooks = [model.drop.register_forward_hook(lambda m, i, o: sizes.__setitem__("embedding", o.abs().mean().item()))]
    for i, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(
            lambda m, inp, o, i=i: sizes.__setitem__(f"block {i}", o.abs().mean().item())))
    try:
        with torch.no_grad():
            sizes["logits"] = model(input_ids).logits.abs().mean().item()
    finally:
        for h in hooks:
            h.remove()
    return sizes


def coordinate_check(
    make_config: Callable[[int], GPTConfig],
    widths: Sequence[int],
    batches: Sequence[dict[str, torch.Tensor]],
    lr: float,
    seeds: Sequence[int] = (0,),
    per_layer_lr: bool = True,
) -> dict[str, np.ndarray]:
    """Activation sizes after training ``len(batches)`` Adam steps, per width.

    ``make_config(width)`` builds the model at each width (muP or not); the optimizer follows
    :func:`mup_param_groups`, or uses one learning rate for every parameter when
    ``per_layer_lr=False`` (the classic mistake: muP's model half without its optimizer half).
    Returns ``{layer name: array of mean |x| per width}`` averaged over ``seeds``. Feed it to
    :func:`width_slopes`.
    """
    out: dict[str, list[float]] = {}
    for width in widths:
        per_seed = []
        for seed in seeds:
            torch.manual_seed(seed)
            model = GPT(make_config(width))
            groups = mup_param_groups(model, lr) if per_layer_lr else model.parameters()
            opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
            for batch in batches:
                loss = model(batch["input_ids"], labels=batch["labels"]).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            per_seed.append(_activation_sizes(model, batches[0]["input_ids"]))
        for name in per_seed[0]:
            out.setdefault(name, []).append(float(np.mean([s[name] for s in per_seed])))
    return {name: np.array(values) for name, values in out.items()}


def width_slopes(widths: Sequence[int], sizes: dict[str, np.ndarray]) -> dict[str, float]:
    """Slope of log(activation size) against log(width) per layer: about 0 when muP is right.

    Under SP after a few Adam steps the logits grow roughly linearly with width (slope near 1);
    under muP every slope stays near 0.
    """
    x = np.log(np.asarray(widths, dtype=float))
    return {name: float(np.polyfit(x, np.log(v), 1)[0]) for name, v in sizes.items()}


def passes_coordinate_check(slopes: dict[str, float], tolerance: float = 0.25) -> bool:
    """True when no layer's activation size grows (or shrinks) with width faster than ``tolerance``."""
    return all(abs(s) <= tolerance for s in slopes.values())

