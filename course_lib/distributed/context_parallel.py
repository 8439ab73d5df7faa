"""Context parallelism: a long sequence split over ranks, attention computed by a ring.

Each of ``N`` ranks holds ``T / N`` tokens of the sequence: its queries, keys and values. Queries
stay where they are; the key/value blocks travel around the ring (rank ``r`` sends to ``r + 1``
and receives from ``r - 1``), so after ``N`` steps every query has met every key. Each rank folds
the blocks it receives into its running softmax (:func:`course_lib.attention.online_softmax_update`,
the same recurrence FlashAttention uses over tiles), so no rank ever holds more than two
key/value blocks or any ``T x T`` matrix: activation memory per rank is that of ``T / N`` tokens.

**The split.** The sequence is cut into ``2N`` equal chunks and every rank holds two of them:

* ``"contiguous"``: rank ``r`` holds chunks ``2r`` and ``2r + 1`` (the plain split);
* ``"zigzag"``: rank ``r`` holds chunks ``r`` and ``2N - 1 - r``.

With a causal mask a (query chunk, key chunk) pair with the key chunk later than the query chunk
is all masked and skipped. Under the contiguous split rank ``r`` then computes ``4r + 3`` pairs
(the last rank ``4N - 1``, the first 3): the others wait for the last. Under zig-zag every rank
computes ``2N + 1`` pairs: the load is balanced.

**Backward.** :class:`RingAttention` saves only the local ``q, k, v``, output and log-sum-exp.
Its backward sends the key/value blocks around the ring again, together with the gradient
blocks ``dk, dv`` that each rank adds its share to; one extra step returns every ``dk, dv`` to its
owner. Each ring step's send and receive are issued together with ``dist.batch_isend_irecv`` (NCCL
needs paired point-to-point operations grouped, or two ranks that both send first deadlock). In
the forward pass the next block's transfer is started before the current block is computed, which
is what lets communication overlap compute on GPUs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from course_lib.attention import (
    attention_block_backward,
    masked_scores,
    online_softmax_finish,
    online_softmax_init,
    online_softmax_update,
)

LAYOUTS = ("contiguous", "zigzag")


def chunk_ids(rank: int, world_size: int, layout: str) -> tuple[int, int]:
    """The two chunks (of ``2 * world_size``) that ``rank`` holds under ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "contiguous":
        return 2 * rank, 2 * rank + 1
    return rank, 2 * world_size - 1 - rank


def _chunk_len(seq_len: int, world_size: int) -> int:
    if seq_len % (2 * world_size):
        raise ValueError(f"sequence length {seq_len} must be a multiple of 2 * world_size = {2 * world_size}")
    return seq_len // (2 * world_size)


def sequence_positions(seq_len: int, world_size: int, rank: int, layout: str) -> Tensor:
    """Positions in the full sequence of the ``seq_len / world_size`` tokens ``rank`` holds."""
    c = _chunk_len(seq_len, world_size)
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in chunk_ids(rank, world_size, layout)])


def shard_sequence(x: Tensor, world_size: int, rank: int, layout: str, dim: int = -2) -> Tensor:
    """The part of ``x`` (sequence along ``dim``) that ``rank`` holds, as a new contiguous tensor."""
    idx = sequence_positions(x.shape[dim], world_size, rank, layout).to(x.device)
    return x.index_select(dim, idx).contiguous()


def unshard_sequence(parts: list[Tensor], layout: str, dim: int = -2) -> Tensor:
    """Inverse of :func:`shard_sequence`: the full sequence from every rank's part, in order."""
    n = len(parts)
    seq_len = parts[0].shape[dim] * n
    full = torch.cat(parts, dim=dim)
    where = torch.cat([sequence_positions(seq_len, n, r, layout) for r in range(n)])
    return full.index_select(dim, torch.argsort(where).to(full.device))


def _ring_exchange(send: Tensor, group: Any) -> tuple[Tensor, list[Any]]:
    """Send ``send`` to the next rank and receive the previous rank's into a new buffer (async)."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    recv = torch.empty_like(send)
    works = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, send, peer((rank + 1) % n), group),
        dist.P2POp(dist.irecv, recv, peer((rank - 1) % n), group),
    ])
    return recv, works


def _pairs(rank: int, src: int, n: int, layout: str, causal: bool) -> list[tuple[int, int, int, int]]:
    """(local query half, key half, query chunk, key chunk) pairs to compute at one ring step."""
    out = []
    for qi, qc in enumerate(chunk_ids(rank, n, layout)):
        for ki, kc in enumerate(chunk_ids(src, n, layout)):
            if not (causal and kc > qc):  # a later key chunk is masked for every query: skip it
                out.append((qi, ki, qc, kc))
    return out


def _halves(x: Tensor) -> list[Tensor]:
    c = x.shape[-2] // 2
    return [x[..., :c, :], x[..., c:, :]]


class RingAttention(torch.autograd.Function):
    """Ring attention over the default group (or ``group``); see the module docstring."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, causal: bool, layout: str, group: Any,
                trace: list[tuple[int, int, int]] | None) -> Tensor:
        rank, n = dist.get_rank(group), dist.get_world_size(group)
        if q.shape[-2] % 2:
            raise ValueError(f"each rank needs an even number of tokens (two chunks), got {q.shape[-2]}")
        scale = 1.0 / math.sqrt(q.shape[-1])
        c = q.shape[-2] // 2
        diag = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        qs = _halves(q)
        states = [online_softmax_init(x) for x in qs]
        kv = torch.stack([k, v])
        for step in range(n):
            src = (rank - step) % n  # whose block this rank holds at this step
            if step < n - 1:
                recv, works = _ring_exchange(kv, group)  # next block in flight while this one computes
            ks, vs = _halves(kv[0]), _halves(kv[1])
            for qi, ki, qc, kc in _pairs(rank, src, n, layout, causal):
                allowed = diag if causal and qc == kc else None
                states[qi] = online_softmax_update(states[qi], masked_scores(qs[qi], ks[ki], scale, allowed), vs[ki])
                if trace is not None:
                    trace.append((step, qc, kc))
            if step < n - 1:
                for w in works:
                    w.wait()
                kv = recv
        outs, lses = zip(*(online_softmax_finish(s) for s in states), strict=True)
        out, lse = torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (causal, layout, group, scale)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        causal, layout, group, scale = ctx.config
        rank, n = dist.get_rank(group), dist.get_world_size(group)
        c = q.shape[-2] // 2
        diag = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        delta = (dout * out).sum(dim=-1)
        dq = torch.zeros_like(q)
        qs, dqs, douts = _halves(q), _halves(dq), _halves(dout)
        lses, deltas = [lse[..., :c], lse[..., c:]], [delta[..., :c], delta[..., c:]]
        buf = torch.stack([k, v, torch.zeros_like(k), torch.zeros_like(v)])  # k, v, dk, dv travel together
        for step in range(n):
            src = (rank - step) % n
            ks, vs, dks, dvs = (_halves(buf[i]) for i in range(4))
            for qi, ki, qc, kc in _pairs(rank, src, n, layout, causal):
                allowed = diag if causal and qc == kc else None
                gq, gk, gv = attention_block_backward(qs[qi], ks[ki], vs[ki], douts[qi], lses[qi], deltas[qi],
                                                      scale, allowed)
                dqs[qi] += gq
                dks[ki] += gk
                dvs[ki] += gv
            if n > 1:  # pass the block on; after the last step only dk, dv travel: home to their owner
                recv, works = _ring_exchange(buf if step < n - 1 else buf[2:].contiguous(), group)
                for w in works:
                    w.wait()
                buf = recv
        dk, dv = (buf[0], buf[1]) if n > 1 else (buf[2], buf[3])
        return dq, dk, dv, None, None, None, None


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, layout: str = "contiguous", group: Any = None,
    trace: list[tuple[int, int, int]] | None = None,
) -> Tensor:
    """Attention of this rank's queries over the whole sequence, which is split over the group.

    ``q, k, v (..., T / N, d)`` are this rank's part of the sequence under ``layout`` (see
    :func:`shard_sequence`), on this rank's device. Returns this rank's part of the output; its
    backward returns this rank's parts of ``dq, dk, dv``. If ``trace`` is a list, one
    ``(ring step, query chunk, key chunk)`` tuple is appended per block pair computed.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return RingAttention.apply(q, k, v, causal, layout, group, trace)


def expected_pairs(rank: int, world_size: int, layout: str, causal: bool = True) -> int:
    """Block pairs ``rank`` computes over the whole ring: ``4N`` without a mask; causal: ``4r + 3`` contiguous, ``2N + 1`` zig-zag."""
    if not causal:
        return 4 * world_size
    return 4 * rank + 3 if layout == "contiguous" else 2 * world_size + 1
