"""Windows of a long token stream: random training batches (resumable) and fixed eval batches.

Every batch is a dict ``{"input_ids": (B, T) long, "labels": (B, T) long}`` where
``labels[:, t]`` is the token after ``input_ids[:, t]`` (the shift happens here, not in the
model).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

Batch = dict[str, torch.Tensor]


def _check_stream(tokens: torch.Tensor, block_size: int, batch_size: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError("tokens must be a 1-D torch tensor of token ids (see encode_corpus)")
    if tokens.dtype != torch.long:
        raise ValueError(f"tokens must be torch.long, got {tokens.dtype}: use tokens.long()")
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}")
    if tokens.numel() <= block_size:
        raise ValueError(
            f"a stream of {tokens.numel()} tokens is too short for block_size={block_size}: a window "
            f"needs block_size + 1 tokens; use a smaller block_size or more text"
        )


def _windows(tokens: torch.Tensor, starts: torch.Tensor, block_size: int) -> Batch:
    idx = starts[:, None] + torch.arange(block_size)
    return {"input_ids": tokens[idx], "labels": tokens[idx + 1]}


class RandomWindowBatches:
    """An endless iterator of random ``(batch_size, block_size)`` windows of ``tokens``.

    Batch number ``i`` depends only on ``(seed, i)``: its window starts are drawn from a
    private generator seeded from both, never from the global RNG. So ``state_dict()``
    (``{"position": i, "seed": seed}``) saved in a checkpoint and given back to
    ``load_state_dict`` resumes the exact same sequence of batches.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int = 0) -> None:
        _check_stream(tokens, block_size, batch_size)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.position = 0

    def batch(self, index: int) -> Batch:
        """The batch at ``index`` (a pure function of ``seed`` and ``index``)."""
        mixed = np.random.SeedSequence([self.seed, index]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(mixed) >> 1)  # manual_seed wants < 2**63
        high = self.tokens.numel() - self.block_size  # last start that still has a label
        starts = torch.randint(0, high, (self.batch_size,), generator=generator)
        return _windows(self.tokens, starts, self.block_size)

    def __iter__(self) -> RandomWindowBatches:
        return self

    def __next__(self) -> Batch:
        out = self.batch(self.position)
        self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        """``{"position": batches already produced, "seed": seed}``."""
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict()``: the next batch is batch ``state["position"]``."""
        self.position = int(state["position"])
        self.seed = int(state["seed"])


def eval_windows(
    tokens: torch.Tensor, block_size: int, batch_size: int, max_batches: int | None = None
) -> list[Batch]:
    """Non-overlapping windows of ``tokens`` from the start, grouped into batches.

    Deterministic (the same list every call), so validation losses are comparable across
    runs. The last batch may hold fewer windows; ``max_batches`` keeps only the first ones.
    """
    _check_stream(tokens, block_size, batch_size)
    n_windows = (tokens.numel() - 1) // block_size
    starts = torch.arange(n_windows) * block_size
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    return [_windows(tokens, chunk, block_size) for chunk in starts.split(batch_size)]
