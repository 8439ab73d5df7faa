"""Where training memory goes, computed (pure functions) and measured (saved-tensor hooks).

Four things occupy memory while a model trains:

* **weights** - the parameters;
* **gradients** - one per trainable parameter;
* **optimizer state** - Adam/AdamW keep two moments (8 bytes/param in fp32) plus one 4-byte
  ``step`` counter per parameter *tensor*; SGD with momentum keeps one buffer; plain SGD none;
* **activations** - the tensors the forward pass saves for the backward pass. They grow with
  batch size and sequence length, and they are what gradient checkpointing trades for compute.

Precision accounting (bytes per parameter, ``weights + gradients + optimizer``):

=============  ===========================================================  ==============
``precision``  what is held                                                  Adam/AdamW
=============  ===========================================================  ==============
``fp32``       fp32 weights, fp32 gradients, fp32 moments                    4 + 4 + 8 = 16
``mixed``      the standard recipe of the ZeRO paper: half-precision          2 + 2 + 12 = 16
               (bf16/fp16) weights and gradients; the optimizer holds an
               fp32 master copy (4) and fp32 moments (8)
``autocast``   PyTorch AMP as ``torch.autocast`` runs it (the course's        4 + 4 + 8 = 16
               training loop): fp32 weights, gradients and moments; the
               half-precision copies of the weights that autocast makes in
               the forward are saved for backward, so they are counted with
               the activations
=============  ===========================================================  ==============

Mixed precision does not shrink the per-parameter bill of Adam (it is 16 bytes either way); it
halves the activations, and it makes the matrix multiplies fast on GPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

PRECISIONS = ("fp32", "mixed", "autocast")
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd_momentum")

#: bytes per parameter for (weights, gradients, optimizer state) under each precision
_WEIGHT_BYTES = {"fp32": 4, "mixed": 2, "autocast": 4}
_GRAD_BYTES = {"fp32": 4, "mixed": 2, "autocast": 4}
_MOMENT_BYTES = {"adamw": 8, "adam": 8, "sgd": 0, "sgd_momentum": 4}
_MASTER_BYTES = {"fp32": 0, "mixed": 4, "autocast": 0}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def bytes_per_param(optimizer: str = "adamw", precision: str = "mixed") -> dict[str, int]:
    """Bytes per parameter for weights, gradients and optimizer state (``step`` counters aside).

    >>> bytes_per_param("adamw", "mixed")
    {'weights': 2, 'gradients': 2, 'optimizer': 12}
    """
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("precision", precision, PRECISIONS)
    return {
        "weights": _WEIGHT_BYTES[precision],
        "gradients": _GRAD_BYTES[precision],
        "optimizer": _MOMENT_BYTES[optimizer] + _MASTER_BYTES[precision],
    }


def memory_breakdown(n_params: float, optimizer: str = "adamw", precision: str = "mixed") -> dict[str, float]:
    """Bytes for the weights, gradients and optimizer state of a model with ``n_params`` parameters.

    Activations are left out: they depend on batch and sequence length, not on the parameter
    count alone (see :func:`estimate_training_memory`). Returns a dict with the keys
    ``weights``, ``gradients``, ``optimizer`` and ``total``.

    >>> memory_breakdown(7e9)["total"] / 1e9   # mixed-precision AdamW: 16 bytes/param
    112.0
    """
    if n_params < 0:
        raise ValueError(f"n_params must be non-negative, got {n_params}")
    per = bytes_per_param(optimizer, precision)
    out = {k: float(n_params) * v for k, v in per.items()}
    out["total"] = sum(out.values())
    return out
