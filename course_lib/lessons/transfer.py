"""Lesson 18: learning-rate sweeps across widths (SP vs muP), WSD vs cosine, Muon vs AdamW.

Every run trains a 2-block GPT with an untied output head (``tie_embeddings=False``: muP scales
the embedding and the head differently) on the bundled Shakespeare characters through
:func:`course_lib.training.train`; only the optimizer or schedule handed to it changes.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

import torch

from course_lib.checkpoint import checkpoint_path, load_checkpoint
from course_lib.data import RandomWindowBatches, encode_corpus
from course_lib.model import GPT, GPTConfig
from course_lib.muon import Muon, muon_param_groups
from course_lib.mup import mup_param_groups
from course_lib.schedulers import warmup_stable_decay
from course_lib.stability import final_loss
from course_lib.training import TrainConfig, make_optimizer, train

BASE_WIDTH = 32
WIDTHS = (32, 64, 128, 256)
LRS = tuple(1e-3 * 2.0**k for k in range(8))  # 1e-3 ... 1.28e-1
SWEEP_STEPS = 300
SEEDS = (0, 1, 2)
BLOCK, BATCH, LAYERS, HEADS = 64, 16, 2, 4


def _data(seed: int) -> tuple[RandomWindowBatches, int]:
    tokens, tokenizer = encode_corpus("shakespeare")
    return RandomWindowBatches(tokens, block_size=BLOCK, batch_size=BATCH, seed=seed), tokenizer.vocab_size


def build_model(width: int, mup: bool, vocab_size: int, seed: int, tie_embeddings: bool = False) -> GPT:
    """The sweep's model at ``width``: standard, or muP relative to ``BASE_WIDTH``."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=BLOCK, n_layer=LAYERS, n_head=HEADS, n_embd=width,
                         mup_base_width=BASE_WIDTH if mup else None, tie_embeddings=tie_embeddings))


def lr_sweep_point(width: int, lr: float, mup: bool, seed: int = 0, steps: int = SWEEP_STEPS,
                   tie_embeddings: bool = False) -> dict[str, Any]:
    """One (width, learning rate, seed) point: AdamW with muP's per-layer rates when ``mup``."""
    batches, vocab = _data(seed)
    model = build_model(width, mup, vocab, seed, tie_embeddings)
    config = TrainConfig(steps=steps, lr=lr, warmup_steps=steps // 10, weight_decay=0.0, seed=seed, progress=False)
    result = train(model, batches, config,
                   optimizer=lambda m: torch.optim.AdamW(mup_param_groups(m, lr), betas=config.betas))
    losses = result.values("loss")
    return {"width": width, "lr": lr, "mup": mup, "seed": seed, "tied": tie_embeddings,
            "final_loss": final_loss(losses)}


def schedule_comparison(width: int, lr: float, budgets: tuple[int, ...], decay_frac: float = 0.2,
                        seed: int = 0) -> dict[str, Any]:
    """Cosine trained anew for each budget vs one WSD run branched into short decays.

    The WSD run holds ``lr`` after warmup and checkpoints at every branch point
    ``budget * (1 - decay_frac)``; each branch reloads that checkpoint (weights, Adam moments,
    data position) and decays linearly to 0 over the remaining steps.
    """
    warmup = budgets[0] // 10
    out: dict[str, Any] = {"width": width, "lr": lr, "budgets": list(budgets), "decay_frac": decay_frac,
                           "cosine": {}, "wsd": {}}
    for budget in budgets:
        batches, vocab = _data(seed)
        model = build_model(width, False, vocab, seed)
        result = train(model, batches, TrainConfig(steps=budget, lr=lr, warmup_steps=warmup, min_lr_ratio=0.0,
                                                   weight_decay=0.0, seed=seed, progress=False))
        out["cosine"][budget] = {"loss": result.values("loss"), "final_loss": final_loss(result.values("loss"))}
    branch_points = [round(b * (1 - decay_frac)) for b in budgets]
    with tempfile.TemporaryDirectory() as tmp:
        batches, vocab = _data(seed)
        model = build_model(width, False, vocab, seed)
        stable = train(model, batches, TrainConfig(
            steps=max(branch_points), lr=lr, warmup_steps=warmup, min_lr_ratio=1.0, weight_decay=0.0, seed=seed,
            progress=False, out_dir=tmp, checkpoint_every=math.gcd(*branch_points), keep_checkpoints=len(budgets) + 1))
        out["wsd"]["stable_loss"] = stable.values("loss")
        for budget, start in zip(budgets, branch_points, strict=True):
            state = load_checkpoint(checkpoint_path(tmp, start))
            model = build_model(width, False, vocab, seed)
            model.load_state_dict(state["model"])
            decay = budget - start
            config = TrainConfig(steps=decay, lr=lr, weight_decay=0.0, seed=seed, progress=False)
            optimizer = make_optimizer(model, config)
            optimizer.load_state_dict(state["optimizer"])
            branch_data, _ = _data(seed)
            branch_data.load_state_dict(state["data"][0])
            result = train(model, branch_data, config, optimizer=optimizer,
                           scheduler=lambda o, d=decay: warmup_stable_decay(o, 0, decay_start=0, decay_steps=d))
            losses = stable.values("loss")[:start] + result.values("loss")
            out["wsd"][budget] = {"branch_from": start, "loss": losses, "final_loss": final_loss(losses)}
    return out


def optimizer_comparison(width: int, adam_lr: float, muon_lr: float, steps: int, seed: int = 0) -> dict[str, Any]:
    """AdamW vs Muon (hidden matrices; AdamW at ``adam_lr`` for the rest) at the same steps."""
    out: dict[str, Any] = {"width": width, "steps": steps, "adam_lr": adam_lr, "muon_lr": muon_lr}
    factories = {
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=adam_lr, betas=(0.9, 0.95), weight_decay=0.0),
        "Muon": lambda m: Muon(muon_param_groups(m, lr=muon_lr, adam_lr=adam_lr)),
    }
    for name, factory in factories.items():
        batches, vocab = _data(seed)
        model = build_model(width, False, vocab, seed)
        result = train(model, batches, TrainConfig(steps=steps, lr=adam_lr, warmup_steps=steps // 10,
                                                   weight_decay=0.0, seed=seed, progress=False),
                       optimizer=factory)
        out[name] = {"loss": result.values("loss"), "final_loss": final_loss(result.values("loss"))}
    return out
