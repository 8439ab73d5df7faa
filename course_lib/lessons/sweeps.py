"""Lesson 10's sweep: train tiny GPTs of several sizes and record their validation curves.

The laws it is fitted with are pure maths in :mod:`course_lib.scaling`; ``scripts/scaling_sweep.py``
runs :func:`sweep_point` per size and caches the result for the lesson.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from course_lib.data import RandomWindowBatches, encode_corpus, eval_windows, train_val_split
from course_lib.model import GPT, GPTConfig
from course_lib.training import TrainConfig, train


@dataclass(frozen=True)
class SweepSize:
    """Shape of one model in a sweep (the vocabulary and context come from the sweep)."""

    n_layer: int
    n_embd: int
    n_head: int


DEFAULT_SWEEP = (SweepSize(1, 16, 2), SweepSize(2, 32, 2), SweepSize(2, 48, 2), SweepSize(3, 64, 4),
                 SweepSize(4, 96, 4))


def sweep_point(
    size: SweepSize,
    steps: int = 400,
    eval_every: int = 25,
    block_size: int = 64,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    corpus: str = "shakespeare",
    threads: int | None = 1,
    progress: bool = False,
) -> dict:
    """Train one model of ``size`` on the character-level corpus; return its validation curve.

    The learning rate is constant after a short warmup, so every evaluation along the way is a
    fair "this many tokens" point (with a decaying schedule, early points would be penalised by
    a still-high rate and late points favoured). Returns plain JSON-able data: the shape,
    ``params`` (all, as Chinchilla counts), ``params_non_embedding`` (as Kaplan counts), and
    ``points``: ``[{"step", "tokens", "val_loss"}, ...]``.
    """
    if threads:
        torch.set_num_threads(threads)
    tokens, tokenizer = encode_corpus(corpus)
    train_tokens, val_tokens = train_val_split(tokens, 0.1, block_size)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=size.n_layer,
                          n_embd=size.n_embd, n_head=size.n_head, dropout=0.0))
    config = TrainConfig(steps=steps, lr=lr, warmup_steps=min(20, steps), min_lr_ratio=1.0, eval_every=eval_every,
                         eval_batches=8, log_every=eval_every, seed=seed, progress=progress)
    t0 = time.perf_counter()
    result = train(model, RandomWindowBatches(train_tokens, block_size, batch_size, seed=seed), config,
                   eval_data=eval_windows(val_tokens, block_size, 32, max_batches=8), device="cpu")
    return {
        "n_layer": size.n_layer, "n_embd": size.n_embd, "n_head": size.n_head,
        "params": model.num_params(), "params_non_embedding": model.num_params(non_embedding=True),
        "seconds": time.perf_counter() - t0,
        "points": [{"step": r["step"], "tokens": r["step"] * batch_size * block_size, "val_loss": r["val_loss"]}
                   for r in result.history if "val_loss" in r],
    }


def sweep_table(runs: list[dict], non_embedding: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten sweep runs into arrays ``(N, D, loss)``: one entry per evaluation point."""
    key = "params_non_embedding" if non_embedding else "params"
    rows = [(r[key], p["tokens"], p["val_loss"]) for r in runs for p in r["points"]]
    if not rows:
        raise ValueError("the sweep holds no evaluation points")
    N, D, L = (np.array(col, dtype=float) for col in zip(*rows, strict=True))
    return N, D, L

