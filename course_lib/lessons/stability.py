"""Lessons 17 and 18: short instrumented training runs for stability and transfer sweeps.

Every run goes through :func:`course_lib.training.train` with the monitors of
:mod:`course_lib.stability` as loggers, on the bundled Shakespeare corpus (characters).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from course_lib.data import RandomWindowBatches, encode_corpus
from course_lib.model import GPT, GPTConfig
from course_lib.stability import AttentionLogitMonitor, OutputLogitMonitor, UpdateRatioLogger
from course_lib.training import TrainConfig, train


@dataclass(frozen=True)
class RunSpec:
    """One short run: the model options and training settings that differ from the defaults."""

    label: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


# Defaults of every stability run: 4 blocks x 128 wide, 16 x 64 characters per step, constant
# learning rate 1e-2 after an optional warmup, AdamW (0.9, 0.95), weight decay 0.1, no clipping.
MODEL_DEFAULTS = dict(block_size=64, n_layer=4, n_head=4, n_embd=128)
TRAIN_DEFAULTS = dict(steps=150, lr=1e-2, warmup_steps=0, betas=(0.9, 0.95), weight_decay=0.1,
                      clip_grad_norm=None, min_lr_ratio=1.0)
BATCH_SIZE = 16

STABILITY_SWEEP = (
    RunSpec("baseline: no warmup, no clipping"),
    RunSpec("warmup 30 steps", train=dict(warmup_steps=30)),
    RunSpec("Adam beta2 0.999", train=dict(betas=(0.9, 0.999))),
    RunSpec("QK-norm", model=dict(qk_norm=True)),
    RunSpec("z-loss 1e-4", model=dict(z_loss=1e-4)),
    RunSpec("logit soft-cap 10", model=dict(logit_softcap=10.0)),
    RunSpec("clip grad norm 1.0", train=dict(clip_grad_norm=1.0)),
    RunSpec("no weight decay", train=dict(weight_decay=0.0)),
    RunSpec("QK-norm + warmup + clip", model=dict(qk_norm=True), train=dict(warmup_steps=30, clip_grad_norm=1.0)),
)


def stability_run(spec: RunSpec, seed: int, steps: int | None = None) -> dict[str, Any]:
    """Train one instrumented run; returns its settings and per-step series.

    Series: ``loss``, ``grad_norm`` (before clipping), ``update_ratio``, ``attn_logit`` (largest
    attention score over all blocks), ``logit_max`` and ``logsumexp`` of the output logits.
    """
    tokens, tokenizer = encode_corpus("shakespeare")
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **{**MODEL_DEFAULTS, **spec.model}))
    settings = {**TRAIN_DEFAULTS, **spec.train, "seed": seed, "progress": False}
    if steps is not None:
        settings["steps"] = steps
    batches = RandomWindowBatches(tokens, block_size=MODEL_DEFAULTS["block_size"], batch_size=BATCH_SIZE, seed=seed)
    attention, output, update = AttentionLogitMonitor(model), OutputLogitMonitor(model), UpdateRatioLogger(model)
    with attention, output:
        result = train(model, batches, TrainConfig(**settings), loggers=[attention, output, update])
    layers = [k for k in attention.values() if k.startswith("attn_logit/")]
    return {
        "label": spec.label, "seed": seed, "spec": asdict(spec), "params": model.num_params(),
        "loss": result.values("loss"),
        "grad_norm": result.values("grad_norm"),
        "update_ratio": update.series("update_ratio"),
        "attn_logit": [max(attention.records[s][k] for k in layers) for s in sorted(attention.records)],
        "attn_logit_per_layer": {k: attention.series(k) for k in layers},
        "logit_max": output.series("logit_max"),
        "logsumexp": output.series("logsumexp"),
    }
