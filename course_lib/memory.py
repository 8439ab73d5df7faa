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


# --------------------------------------------------------------------------------------------
# The estimator for the course's GPT
# --------------------------------------------------------------------------------------------

_LINEAR_SHAPES = {  # (in_features, out_features) of each linear in a block, in units of n_embd
    "q_proj": (1, 1), "k_proj": (1, 1), "v_proj": (1, 1), "o_proj": (1, 1),
    "fc_in": (1, 4), "fc_out": (4, 1),
}


def num_param_tensors(config: Any) -> int:
    """How many parameter tensors :class:`~course_lib.model.GPT` has (Adam keeps a ``step`` per tensor)."""
    per_linear = 2 if config.bias else 1
    per_norm = 2 if config.bias else 1
    per_block = 6 * per_linear + 2 * per_norm
    return 2 + config.n_layer * per_block + per_norm  # wte (tied with the head), wpe, blocks, ln_f


def lora_num_params(config: Any, rank: int, targets: Iterable[str] = ("q_proj", "v_proj")) -> int:
    """Parameters LoRA adds to the GPT: ``rank * (in + out)`` for each targeted linear of each block."""
    d = config.n_embd
    total = 0
    for name in targets:
        if name not in _LINEAR_SHAPES:
            raise ValueError(f"unknown LoRA target {name!r}; choose among {sorted(_LINEAR_SHAPES)}")
        fan_in, fan_out = _LINEAR_SHAPES[name]
        total += rank * (fan_in + fan_out) * d
    return config.n_layer * total


@dataclass
class MemoryEstimate:
    """Bytes of each part of training memory (see :func:`estimate_training_memory`).

    ``activations_per_layer[i]`` is what block ``i`` keeps for backward; ``activations_other``
    the embeddings, final norm, head and loss; ``weight_copies`` the half-precision copies of
    the weights that autocast saves for backward (zero without autocast); ``recompute_peak``
    the extra memory of one block's recomputation during backward when checkpointing.
    """

    weights: int
    gradients: int
    optimizer: int
    activations_per_layer: list[int]
    activations_other: int
    weight_copies: int = 0
    recompute_peak: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def activations(self) -> int:
        """Everything saved for backward at the end of the forward pass."""
        return sum(self.activations_per_layer) + self.activations_other + self.weight_copies

    @property
    def params_grads_optimizer(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """Peak: weights + gradients + optimizer state + activations (+ one recomputed block)."""
        return self.params_grads_optimizer + self.activations + self.recompute_peak

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
            "activations": self.activations, "total": self.total,
        }


def _block_activation_bytes(
    d: int, h: int, T: int, tokens: int, r: int, a: int, *,
    dropout: bool, autocast: bool, lora: dict[str, int], first: bool,
) -> int:
    """Bytes one block saves for backward (``r``: residual-stream dtype bytes, ``a``: matmul dtype bytes).

    Per token: the two LayerNorm inputs (residual stream, ``r``); the LayerNorm outputs, q, k, v,
    the attention output, and the MLP hidden before and after GELU (4d each) (``a``); LayerNorm
    mean and rstd and the attention logsumexp (fp32).
    """
    stats = 4 * tokens * (2 + 2 + h)
    elems_r = 2 * d
    elems_a = 2 * d + 3 * d + d + 4 * d + 4 * d
    if autocast:
        elems_a += 2 * d  # q, k and v each cast the LayerNorm output to half precision: three copies
    if lora:
        # A frozen linear saves no input for its (absent) weight gradient; LoRA saves the input of
        # A (shared with the base) and A's (rank-sized) output. Only the first block differs: its
        # input does not require grad, so its first LayerNorm and the q/k/v inputs save nothing
        # unless a LoRA adapter needs them.
        elems_a += sum(lora.values())
        if first:
            elems_r -= d
            stats -= 4 * tokens * 2
            if not any(t in lora for t in ("q_proj", "k_proj", "v_proj")):
                elems_a -= d
    if dropout:
        # two residual dropout masks (in the activation dtype on CPU); attention takes the math
        # path: softmax output, its dropout mask and the dropped probabilities (h x T each), no
        # logsumexp
        elems_a += 2 * d + 3 * h * T
        stats -= 4 * tokens * h
    return tokens * (elems_r * r + elems_a * a) + stats


def estimate_training_memory(
    config: Any,
    batch_size: int,
    seq_len: int | None = None,
    optimizer: str = "adamw",
    precision: str = "fp32",
    checkpointing: bool | int = False,
    lora_rank: int | None = None,
    lora_targets: Iterable[str] = ("q_proj", "v_proj"),
) -> MemoryEstimate:
    """Predict the training memory of :class:`~course_lib.model.GPT` for one batch.

    Args:
        config: the model's :class:`~course_lib.model.GPTConfig`.
        batch_size, seq_len: the micro-batch shape (``seq_len`` defaults to ``config.block_size``).
        optimizer: ``"adamw"``/``"adam"`` (two fp32 moments and a 4-byte ``step`` per tensor),
            ``"sgd_momentum"`` (one buffer) or ``"sgd"`` (no state).
        precision: ``"fp32"``, ``"mixed"`` or ``"autocast"`` (see the module docstring).
        checkpointing: ``False``, ``True`` (every block) or ``k`` (blocks 0, k, 2k, ...), as
            :func:`enable_gradient_checkpointing` wraps them: a checkpointed block keeps only its input.
        lora_rank: with LoRA, the base is frozen: only the adapters have gradients and optimizer
            state; ``lora_targets`` names the wrapped linears of each block.

    The weight, gradient and optimizer terms are exact for ``fp32`` and ``autocast`` (a test
    compares them with the real tensors after an optimizer step). The activation term counts
    every tensor saved for backward (see :func:`saved_activation_bytes`), with dropout masks
    when ``config.dropout > 0``.
    """
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("precision", precision, PRECISIONS)
    T = config.block_size if seq_len is None else seq_len
    if T > config.block_size:
        raise ValueError(f"seq_len={T} exceeds block_size={config.block_size}")
    if batch_size < 1 or T < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {T}")
    every = int(checkpointing) if not isinstance(checkpointing, bool) else (1 if checkpointing else 0)
    if every < 0:
        raise ValueError(f"checkpointing must be False, True or a positive block stride, got {checkpointing}")
    from course_lib.model import closed_form_num_params

    d, h, L, V = config.n_embd, config.n_head, config.n_layer, config.vocab_size
    tokens = batch_size * T
    n_params = closed_form_num_params(config)
    per = bytes_per_param(optimizer, precision)
    step_counters = 4 if optimizer in ("adam", "adamw") else 0

    lora_elems: dict[str, int] = {}
    if lora_rank:
        targets = tuple(lora_targets)
        n_lora = lora_num_params(config, lora_rank, targets)
        n_trainable, n_trainable_tensors = n_lora, 2 * len(targets) * L
        for t in targets:
            lora_elems[t] = lora_rank  # the output of A, saved by B
        weights = (n_params + n_lora) * per["weights"]
    else:
        n_trainable, n_trainable_tensors = n_params, num_param_tensors(config)
        weights = n_params * per["weights"]
    gradients = n_trainable * per["gradients"]
    optim = n_trainable * per["optimizer"] + n_trainable_tensors * step_counters

    r = 2 if precision == "mixed" else 4
    a = 4 if precision == "fp32" else 2
    dropout = config.dropout > 0
    full_block = [
        _block_activation_bytes(
            d, h, T, tokens, r, a, dropout=dropout, autocast=precision == "autocast", lora=lora_elems, first=i == 0,
        )
        for i in range(L)
    ]
    per_layer = [
        tokens * d * r if every and i % every == 0 else full_block[i] for i in range(L)
    ]
    # embedding (token ids and positions, int64), final LayerNorm (input, output, stats), and the
    # fp32 log-softmax of the loss with its int64 targets and its fp32 total weight
    other = 8 * tokens + 8 * T + tokens * (d * r + d * a + 8) + tokens * (4 * V + 8) + 4
    if dropout:
        other += tokens * d * a  # embedding dropout mask
    copies = 0
    if precision == "autocast":
        # autocast casts each linear weight (and the tied head) to half precision once per forward
        # and saves the copy for backward; a checkpointed block casts again when it recomputes
        plain_blocks = sum(1 for i in range(L) if not (every and i % every == 0))
        per_block = 12 * d * d
        if lora_rank:
            per_block += lora_num_params(config, lora_rank, tuple(lora_targets)) // L
        copies = 2 * (plain_blocks * per_block + V * d)
    recompute = max(full_block) if every else 0
    return MemoryEstimate(
        weights=weights, gradients=gradients, optimizer=optim,
        activations_per_layer=per_layer, activations_other=other, weight_copies=copies,
        recompute_peak=recompute,
        notes={"n_params": n_params, "n_trainable": n_trainable, "tokens": tokens},
    )


# --------------------------------------------------------------------------------------------
# Measuring: saved-tensor hooks
# --------------------------------------------------------------------------------------------

_ACTIVE_COUNTERS: list[_SavedTensorCounter] = []


class _SavedTensorCounter:
    """Counts the distinct storages saved for backward, attributing each to the running module."""

    def __init__(self, exclude: Iterable[torch.Tensor]) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: dict[int, tuple[int, str]] = {}
        self.keep: list[torch.Tensor] = []  # keeps storages alive so no address is reused
        self.labels: list[str] = ["other"]

    def add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.exclude or ptr in self.seen:
            return
        self.seen[ptr] = (storage.nbytes(), self.labels[-1])
        self.keep.append(t)

    def enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.labels.append(name)
        return hook

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.labels.pop()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t


@dataclass
class SavedActivations:
    """Result of :func:`saved_activation_bytes`.

    ``total`` bytes saved for backward (distinct storages, parameters excluded), ``by_module``
    the same split by the module that saved them, ``peak_allocated`` the rise of CUDA's peak
    allocated memory during the forward (``None`` off CUDA), ``n_tensors`` distinct storages.
    """

    total: int
    by_module: dict[str, int]
    n_tensors: int
    peak_allocated: int | None = None


def saved_activation_bytes(
    fn: Callable[..., Any],
    *args: Any,
    exclude: Iterable[torch.Tensor] | None = None,
    modules: dict[str, nn.Module] | None = None,
    **kwargs: Any,
) -> SavedActivations:
    """Run ``fn(*args, **kwargs)`` with grad enabled and measure what it saves for backward.

    Every tensor autograd saves passes through ``torch.autograd.graph.saved_tensors_hooks``;
    the hook records its storage once (views and tensors saved by several ops share a storage
    and are counted once). Parameters and buffers are not activations: when ``fn`` is a module
    its own are excluded, otherwise pass them as ``exclude``. ``modules`` (name -> module)
    splits the bytes by module; for a model with ``.blocks`` it defaults to ``blocks.i``.

    Blocks wrapped by :func:`enable_gradient_checkpointing` save nothing through the hooks
    (the checkpoint installs its own); they keep their *inputs* for the recomputation, and they
    report those here, so the measurement is what checkpointing really keeps.
    """
    if exclude is None:
        exclude = list(fn.parameters()) + list(fn.buffers()) if isinstance(fn, nn.Module) else []
    if modules is None and isinstance(getattr(fn, "blocks", None), nn.ModuleList):
        modules = {f"blocks.{i}": b for i, b in enumerate(fn.blocks)}
    counter = _SavedTensorCounter(exclude)
    handles = []
    for name, module in (modules or {}).items():
        handles.append(module.register_forward_pre_hook(counter.enter(name)))
        handles.append(module.register_forward_hook(counter.leave))
    cuda = torch.cuda.is_available() and any(
        isinstance(x, torch.Tensor) and x.is_cuda for x in (*args, *kwargs.values())
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    _ACTIVE_COUNTERS.append(counter)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            out = fn(*args, **kwargs)
        peak = None
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
    finally:
        _ACTIVE_COUNTERS.remove(counter)
        for handle in handles:
            handle.remove()
    del out
    by_module: dict[str, int] = {}
    for nbytes, label in counter.seen.values():
        by_module[label] = by_module.get(label, 0) + nbytes
    counter.keep.clear()
    return SavedActivations(
        total=sum(by_module.values()), by_module=by_module, n_tensors=len(counter.seen), peak_allocated=peak,
    )


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Measured bytes of the real tensors: weights, gradients (``.grad`` that exist), optimizer state.

    Shared parameters (the tied embedding and head) are counted once.
    """
    params = list({id(p): p for p in model.parameters()}.values())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    optim = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    optim += value.numel() * value.element_size()
    return {"weights": weights, "gradients": grads, "optimizer": optim}


# --------------------------------------------------------------------------------------------
# Gradient checkpointing that keeps the trained weights
# --------------------------------------------------------------------------------------------

class _CheckpointedForward:
    """Replaces one module's ``forward``: the same computation under ``torch.utils.checkpoint``.

    The module itself (its parameters, their names in ``state_dict``) is untouched; only the
    call goes through the checkpoint, which drops the module's saved tensors after the forward
    and recomputes them in the backward.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.module).forward.__get__(self.module)
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        for counter in _ACTIVE_COUNTERS:  # what the checkpoint keeps for its recomputation
            for x in (*args, *kwargs.values()):
                counter.add(x)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _blocks_of(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no `blocks` ModuleList; gradient checkpointing wraps "
            "model.blocks[i] (course_lib.model.GPT has them)"
        )
    return blocks


def enable_gradient_checkpointing(model: nn.Module, every: int = 1) -> nn.Module:
    """Checkpoint blocks ``0, every, 2*every, ...`` of ``model.blocks``, in place; returns ``model``.

    The *existing* blocks are wrapped (their forward runs under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``): no layer is re-created, so
    the trained weights, the optimizer's references to them and the ``state_dict`` keys are
    all unchanged, and the outputs and gradients equal the plain model's.
    """
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive integer (1 = every block), got {every!r}")
    blocks = _blocks_of(model)
    disable_gradient_checkpointing(model)
    for i, block in enumerate(blocks):
        if i % every == 0:
            block.forward = _CheckpointedForward(block)
    return model


def disable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_gradient_checkpointing` (no-op for blocks that are not wrapped)."""
    for block in _blocks_of(model):
        if is_checkpointed(block):
            del block.forward
    return model


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``module``'s forward runs under gradient checkpointing."""
    return isinstance(module.__dict__.get("forward"), _CheckpointedForward)
