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
    head = 0 if getattr(config, "tie_embeddings", True) else 1  # an untied head is one more matrix
    return 2 + head + config.n_layer * per_block + per_norm  # wte (and the head), wpe, blocks, ln_f


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


@dataclass
class _Shape:
    """What the activation walk needs to know: sizes, dtype bytes, and what is trainable."""

    d: int
    h: int
    T: int
    tokens: int
    r: int  # bytes of the residual stream (LayerNorm inputs)
    a: int  # bytes of matmul inputs/outputs
    dropout: bool
    autocast: bool
    lora: frozenset[str]  # LoRA targets; empty means full training (every weight trainable)
    rank: int = 0

    @property
    def full(self) -> bool:
        return not self.lora


def _linear(s: _Shape, name: str, fan_in: int, fan_out: int, input_grad: bool) -> tuple[int, int, bool]:
    """(activation bytes beyond the input, weight-copy elements, output requires grad) of one linear.

    Its *input* is counted by the caller (several linears share one input). Under autocast the
    half-precision copy of the weight is saved when the input needs a gradient (grad_input = grad @ W).
    A LoRA adapter saves A's output (rank wide) for B, and the weight copies of A and B.
    """
    act, copies = 0, 0
    if s.autocast and input_grad:
        copies += fan_in * fan_out * s.d * s.d
    if name in s.lora:
        act += s.tokens * s.rank * s.a
        if s.autocast:
            copies += s.rank * fan_out * s.d + (s.rank * fan_in * s.d if input_grad else 0)
    return act, copies, input_grad or s.full or name in s.lora


def _saves_input(s: _Shape, name: str) -> bool:
    """A linear keeps its input when its weight is trained (full training) or it carries LoRA (for A)."""
    return s.full or name in s.lora


def _block_activations(s: _Shape, grad_in: bool) -> tuple[int, int, bool]:
    """Walk one block as autograd does: (bytes saved, weight-copy elements, output requires grad).

    A tensor is saved only when some gradient needs it, which is why a frozen model (LoRA) keeps
    less: a frozen linear needs no input for its weight gradient.
    """
    d, tokens, r, a = s.d, s.tokens, s.r, s.a
    norm = tokens * (d * r + 2 * 4)  # LayerNorm input (residual stream) and its fp32 mean and rstd
    act, copies = 0, 0
    # attention: x + o_proj(sdpa(q(ln_1(x)), k(.), v(.)))
    ln1_grad = grad_in or s.full
    act += norm if ln1_grad else 0
    qkv_grad, ln1_out_users = False, 0
    for name in ("q_proj", "k_proj", "v_proj"):
        extra, c, g = _linear(s, name, 1, 1, ln1_grad)
        act, copies, qkv_grad = act + extra, copies + c, qkv_grad or g
        ln1_out_users += _saves_input(s, name)
    # fp32: q, k and v save the same LayerNorm output; autocast casts it once per linear
    act += tokens * d * a * (ln1_out_users if s.autocast else min(ln1_out_users, 1))
    if qkv_grad:
        if s.dropout:  # the math path: q, k, v, softmax output, its dropout mask, dropped probabilities
            act += tokens * (3 * d + 3 * s.h * s.T) * a
        else:  # the fused path: q, k, v, output (which o_proj reads in place) and fp32 logsumexp
            act += tokens * (4 * d * a + 4 * s.h)
    if _saves_input(s, "o_proj") and (s.dropout or not qkv_grad):
        act += tokens * d * a  # o_proj's input when the attention did not already keep it
    extra, c, o_grad = _linear(s, "o_proj", 1, 1, qkv_grad)
    act, copies = act + extra, copies + c
    act += tokens * d * a if s.dropout and o_grad else 0  # residual dropout mask
    grad_mid = grad_in or o_grad
    # MLP: x + fc_out(gelu(fc_in(ln_2(x))))
    ln2_grad = grad_mid or s.full
    act += norm if ln2_grad else 0
    act += tokens * d * a if _saves_input(s, "fc_in") else 0
    extra, c, h_grad = _linear(s, "fc_in", 1, 4, ln2_grad)
    act, copies = act + extra, copies + c
    act += tokens * 4 * d * a if h_grad else 0  # GELU keeps its input
    act += tokens * 4 * d * a if _saves_input(s, "fc_out") else 0  # fc_out keeps GELU's output
    extra, c, f_grad = _linear(s, "fc_out", 4, 1, h_grad)
    act, copies = act + extra, copies + c
    act += tokens * d * a if s.dropout and f_grad else 0
    return act, copies, grad_mid or f_grad


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
        lora_rank: with LoRA (dropout 0), the base is frozen: only the adapters have gradients and
            optimizer state; ``lora_targets`` names the wrapped linears of each block.

    The weight, gradient and optimizer terms are exact for ``fp32`` and ``autocast`` (a test
    compares them with the real tensors after an optimizer step). The activation term walks the
    model as autograd does and counts every tensor saved for backward (see
    :func:`saved_activation_bytes`), dropout masks included when ``config.dropout > 0``.
    """
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("precision", precision, PRECISIONS)
    T = config.block_size if seq_len is None else seq_len
    if T > config.block_size:
        raise ValueError(f"seq_len={T} exceeds block_size={config.block_size}")
    if batch_size < 1 or T < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {T}")
    extras = [name for name, off in (("qk_norm", False), ("z_loss", 0.0), ("logit_softcap", None),
                                     ("mup_base_width", None), ("tie_embeddings", True))
              if getattr(config, name, off) != off]
    if extras:
        raise ValueError(
            f"the estimate models the default GPT; {', '.join(extras)} change(s) what autograd saves. "
            "Measure those models with saved_activation_bytes instead"
        )
    every = int(checkpointing) if not isinstance(checkpointing, bool) else (1 if checkpointing else 0)
    if every < 0:
        raise ValueError(f"checkpointing must be False, True or a positive block stride, got {checkpointing}")
    from course_lib.model import closed_form_num_params

    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    tokens = batch_size * T
    n_params = closed_form_num_params(config)
    per = bytes_per_param(optimizer, precision)
    step_counters = 4 if optimizer in ("adam", "adamw") else 0
    targets = frozenset(lora_targets) if lora_rank else frozenset()
    if lora_rank:
        n_lora = lora_num_params(config, lora_rank, targets)
        n_trainable, n_trainable_tensors = n_lora, 2 * len(targets) * L
    else:
        n_lora, n_trainable, n_trainable_tensors = 0, n_params, num_param_tensors(config)
    weights = (n_params + n_lora) * per["weights"]
    gradients = n_trainable * per["gradients"]
    optim = n_trainable * per["optimizer"] + n_trainable_tensors * step_counters

    shape = _Shape(
        d=d, h=config.n_head, T=T, tokens=tokens, r=2 if precision == "mixed" else 4,
        a=4 if precision == "fp32" else 2, dropout=config.dropout > 0, autocast=precision == "autocast",
        lora=targets, rank=lora_rank or 0,
    )
    per_layer, full_block, copies = [], [], 0
    grad = False  # the embeddings' output needs a gradient only in full training
    for i in range(L):
        act, c, grad_out = _block_activations(shape, grad)
        full_block.append(act)
        if every and i % every == 0:
            per_layer.append(tokens * d * shape.r)  # the checkpoint keeps the block's input
        else:
            per_layer.append(act)
            copies += c
        grad = grad_out
    # the loss: fp32 log-softmax output, int64 targets, fp32 total weight
    other = tokens * (4 * V + 8) + 4
    if shape.full:
        # embeddings keep token ids and positions (int64); the head keeps the final LayerNorm's output
        other += 8 * tokens + 8 * T + tokens * d * shape.a
        other += tokens * d * shape.a if shape.dropout else 0  # embedding dropout mask
    if grad or shape.full:
        other += tokens * (d * shape.r + 8)  # final LayerNorm input and stats
        copies += V * d if shape.autocast else 0  # half-precision copy of the tied head
    return MemoryEstimate(
        weights=weights, gradients=gradients, optimizer=optim,
        activations_per_layer=per_layer, activations_other=other, weight_copies=2 * copies,
        recompute_peak=max(full_block) if every else 0,
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


def enable_gradient_checkpointing(model: nn.Module, every: int = 1, part: str = "block") -> nn.Module:
    """Checkpoint blocks ``0, every, 2*every, ...`` of ``model.blocks``, in place; returns ``model``.

    ``part`` chooses what is recomputed: ``"block"`` (the whole block: it keeps only its input),
    or *selective* checkpointing of one sub-layer, ``"attn"`` (attention only) or ``"mlp"``
    (the MLP only): less memory saved than the whole block, for less recomputation.

    The *existing* blocks are wrapped (their forward runs under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``): no layer is re-created, so
    the trained weights, the optimizer's references to them and the ``state_dict`` keys are
    all unchanged, and the outputs and gradients equal the plain model's.
    """
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive integer (1 = every block), got {every!r}")
    if part not in ("block", "attn", "mlp"):
        raise ValueError(f"part must be 'block', 'attn' or 'mlp', got {part!r}")
    blocks = _blocks_of(model)
    disable_gradient_checkpointing(model)
    for i, block in enumerate(blocks):
        if i % every == 0:
            target = block if part == "block" else getattr(block, part)
            target.forward = _CheckpointedForward(target)
    return model


def disable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_gradient_checkpointing` (no-op for blocks that are not wrapped)."""
    for block in _blocks_of(model):
        for module in (block, getattr(block, "attn", None), getattr(block, "mlp", None)):
            if module is not None and is_checkpointed(module):
                del module.forward
    return model


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``module``'s forward runs under gradient checkpointing."""
    return isinstance(module.__dict__.get("forward"), _CheckpointedForward)
