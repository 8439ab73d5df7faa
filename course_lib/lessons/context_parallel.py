"""Harness for lesson 15 and its tests: ring attention run by spawned ranks, checked on one process."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from course_lib.distributed.context_parallel import ring_attention, shard_sequence, unshard_sequence
from course_lib.distributed.launch import rank_device
from course_lib.memory import saved_activation_bytes


def make_inputs(batch: int, heads: int, seq_len: int, head_dim: int, seed: int = 0,
                dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """The full ``q, k, v`` and an upstream gradient ``dout``, the same on every process."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq_len, head_dim, generator=g, dtype=dtype) for _ in range(4)]


def full_attention(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, causal: bool) -> dict[str, Tensor]:
    """The single-process reference: SDPA's output and the gradients of ``q, k, v``."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def ring_cases_worker(rank: int, world_size: int, cases: list[tuple[bool, str]], shape: tuple[int, int, int, int],
                      seed: int) -> list[dict[str, Any]]:
    """Run ring attention forward and backward for each ``(causal, layout)``; return this rank's parts.

    ``shape`` is ``(batch, heads, seq_len, head_dim)`` of the full sequence. Each result holds the
    rank's ``out, dq, dk, dv`` (CPU), its ``trace`` of computed (step, query chunk, key chunk) and
    ``saved``, the bytes its forward keeps for backward (saved-tensor hooks, a second forward).
    """
    device = rank_device()
    q, k, v, dout = make_inputs(*shape, seed=seed)
    results = []
    for causal, layout in cases:
        local = [shard_sequence(x, world_size, rank, layout).to(device).requires_grad_() for x in (q, k, v)]
        trace: list[tuple[int, int, int]] = []
        out = ring_attention(*local, causal=causal, layout=layout, trace=trace)
        out.backward(shard_sequence(dout, world_size, rank, layout).to(device))
        saved = saved_activation_bytes(ring_attention, *local, causal=causal, layout=layout).total
        results.append({"causal": causal, "layout": layout, "trace": trace, "saved": saved, "out": out.detach().cpu(),
                        **{f"d{n}": x.grad.cpu() for n, x in zip("qkv", local, strict=True)}})
    return results


def ring_memory_worker(rank: int, world_size: int, seq_lens: list[int], batch: int, heads: int,
                       head_dim: int) -> list[int]:
    """Bytes this rank's ring attention saves for backward (saved-tensor hooks), per sequence length."""
    device = rank_device()
    out = []
    for seq_len in seq_lens:
        q, k, v, _ = make_inputs(batch, heads, seq_len, head_dim, dtype=torch.float32)
        local = [shard_sequence(x, world_size, rank, "zigzag").to(device).requires_grad_() for x in (q, k, v)]
        out.append(saved_activation_bytes(ring_attention, *local, causal=True, layout="zigzag").total)
    return out


def gather_case(per_rank: list[list[dict[str, Any]]], i: int) -> dict[str, Tensor]:
    """Case ``i`` of every rank reassembled into full-sequence ``out, dq, dk, dv`` (un-permuted)."""
    layout = per_rank[0][i]["layout"]
    return {n: unshard_sequence([r[i][n] for r in per_rank], layout) for n in ("out", "dq", "dk", "dv")}


def work_per_rank(per_rank: list[list[dict[str, Any]]], i: int) -> list[int]:
    """Number of (query chunk, key chunk) block pairs each rank computed in case ``i``."""
    return [len(r[i]["trace"]) for r in per_rank]
