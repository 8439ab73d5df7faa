"""Attention's memory: naive attention, and the tiled online-softmax attention of FlashAttention.

Naive attention materialises the scores ``S = q k^T / sqrt(d)`` and the probabilities
``P = softmax(S)``, a ``T x T`` matrix per head, and autograd keeps ``P`` for the backward pass:
memory grows with ``T**2``. FlashAttention never holds ``P``. It walks over blocks of keys and
keeps, for every query row, three running quantities (the *online softmax*):

* ``m``  - the largest score seen so far (for numerical safety),
* ``l``  - the sum of ``exp(score - m)`` over the keys seen so far,
* ``acc`` - the sum of ``exp(score - m) * v`` over the keys seen so far.

When a new block of scores ``s`` arrives, with ``m' = max(m, rowmax(s))``, the old sums are
rescaled by ``exp(m - m')`` and the block's terms added::

    l'   = exp(m - m') * l   + rowsum(exp(s - m'))
    acc' = exp(m - m') * acc + exp(s - m') @ v

After the last block the output is ``acc / l`` and the log-sum-exp of the row is ``m + log(l)``.
The backward pass needs only ``q, k, v``, the output and the log-sum-exp: it recomputes each
block of ``P = exp(s - lse)`` from them (:class:`TiledAttention`). Saved memory is linear in ``T``.

Masks follow ``F.scaled_dot_product_attention``: a boolean ``attn_mask`` is *True where a query
may attend*; ``causal=True`` lets query ``i`` see keys ``j <= i``. A query row with no allowed key
(a padded row) has no softmax at all: naive softmax returns NaN there, and every function in
this module returns zeros (:func:`safe_max`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from course_lib.memory import saved_activation_bytes

SoftmaxState = tuple[Tensor, Tensor, Tensor]  # (m, l, acc): running max, running sum, running output


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def causal_allowed(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Boolean ``(len(q_pos), len(k_pos))`` mask, True where key position <= query position."""
    return k_pos[None, :] <= q_pos[:, None]


def masked_scores(q: Tensor, k: Tensor, scale: float, allowed: Tensor | None) -> Tensor:
    """``q k^T * scale`` with ``-inf`` wherever ``allowed`` (broadcastable boolean) is False."""
    s = (q @ k.transpose(-2, -1)) * scale
    return s if allowed is None else s.masked_fill(~allowed, float("-inf"))


def _allowed(tq: int, tk: int, device: torch.device, causal: bool, attn_mask: Tensor | None) -> Tensor | None:
    allowed = attn_mask
    if causal:
        c = causal_allowed(torch.arange(tq, device=device), torch.arange(tk, device=device))
        allowed = c if allowed is None else allowed & c
    return allowed


def naive_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Textbook attention ``softmax(q k^T / sqrt(d)) v``: builds the full ``(..., T, T)`` matrix.

    A row whose keys are all masked gives NaN (``softmax`` of all ``-inf``): the pitfall.
    """
    allowed = _allowed(q.shape[-2], k.shape[-2], q.device, causal, attn_mask)
    p = torch.softmax(masked_scores(q, k, _scale(q, scale), allowed), dim=-1)
    return p @ v


def safe_max(m: Tensor) -> Tensor:
    """The running max with ``-inf`` replaced by 0, so ``exp(-inf - m)`` is 0, never ``exp(nan)``.

    While every score of a row seen so far is masked, ``m = -inf`` and ``s - m`` would be
    ``-inf - (-inf) = NaN``. Subtracting 0 instead gives ``exp(-inf) = 0``: the row stays empty.
    """
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def online_softmax_init(q: Tensor) -> SoftmaxState:
    """The empty state for the rows of ``q`` (shape ``(..., Tq, d)``): ``m=-inf, l=0, acc=0``."""
    m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
    return m, torch.zeros_like(m), torch.zeros_like(q)


def online_softmax_update(state: SoftmaxState, s: Tensor, v: Tensor) -> SoftmaxState:
    """Fold one block of scores ``s`` (``(..., Tq, Tk)``, masked entries ``-inf``) and values ``v`` in."""
    m, l, acc = state
    m_new = torch.maximum(m, s.amax(dim=-1))
    m_safe = safe_max(m_new)
    alpha = torch.exp(m - m_safe)  # rescales what was summed under the old max
    p = torch.exp(s - m_safe[..., None])
    return m_new, alpha * l + p.sum(dim=-1), alpha[..., None] * acc + p @ v


def online_softmax_finish(state: SoftmaxState) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` from the state: ``acc / l`` and ``m + log l`` (0 and ``-inf`` for empty rows)."""
    m, l, acc = state
    empty = l == 0
    out = acc / torch.where(empty, torch.ones_like(l), l)[..., None]
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(torch.where(empty, torch.ones_like(l), l)))
    return out, lse


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _block_mask(causal: bool, attn_mask: Tensor | None, q0: int, q1: int, k0: int, k1: int,
                device: torch.device) -> tuple[bool, Tensor | None]:
    """(skip, allowed) for the block of queries ``q0:q1`` and keys ``k0:k1``."""
    if causal and k0 > q1 - 1:
        return True, None  # every key of the block is after every query: nothing to compute
    allowed = None if attn_mask is None else attn_mask[..., q0:q1, k0:k1]
    if causal and k1 - 1 > q0:  # the block crosses the diagonal
        c = causal_allowed(torch.arange(q0, q1, device=device), torch.arange(k0, k1, device=device))
        allowed = c if allowed is None else allowed & c
    return False, allowed


def tiled_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attn_mask: Tensor | None = None,
    scale: float | None = None, block_q: int = 64, block_k: int = 64,
) -> tuple[Tensor, Tensor]:
    """FlashAttention's forward in plain PyTorch: ``(out, lse)``, never more than one score block.

    ``q (..., Tq, d)``, ``k, v (..., Tk, d)``; ``lse (..., Tq)`` is the log-sum-exp of each row's
    scores (``-inf`` for a fully masked row, whose output is 0). With ``causal`` the blocks above
    the diagonal are skipped. ``Tq``, ``Tk`` need not be multiples of the block sizes.
    """
    sc = _scale(q, scale)
    outs, lses = [], []
    for q0, q1 in _blocks(q.shape[-2], block_q):
        qb = q[..., q0:q1, :]
        state = online_softmax_init(qb)
        for k0, k1 in _blocks(k.shape[-2], block_k):
            skip, allowed = _block_mask(causal, attn_mask, q0, q1, k0, k1, q.device)
            if not skip:
                state = online_softmax_update(state, masked_scores(qb, k[..., k0:k1, :], sc, allowed), v[..., k0:k1, :])
        out, lse = online_softmax_finish(state)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def attention_block_backward(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, scale: float,
    allowed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one (query block, key block) pair, from recomputed probabilities.

    ``P = exp(s - lse)`` is rebuilt from the scores; ``delta = rowsum(dout * out)``. Then
    ``dV = P^T dout``, ``dP = dout V^T``, ``dS = P * (dP - delta)``, ``dQ = dS K * scale``,
    ``dK = dS^T Q * scale``. Returns ``(dq, dk, dv)`` contributions of this block.
    """
    p = torch.exp(masked_scores(q, k, scale, allowed) - safe_max(lse)[..., None])
    dv = p.transpose(-2, -1) @ dout
    ds = p * (dout @ v.transpose(-2, -1) - delta[..., None])
    return (ds @ k) * scale, (ds.transpose(-2, -1) @ q) * scale, dv


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a gradient over the dimensions that were broadcast (e.g. a key shared by all heads)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, n in enumerate(shape):
        if n == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


class TiledAttention(torch.autograd.Function):
    """Tiled attention whose backward recomputes the score blocks (FlashAttention's trade).

    Saves exactly ``q, k, v, out, lse`` for backward: no ``T x T`` tensor.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, causal: bool, attn_mask: Tensor | None,
                scale: float | None, block_q: int, block_k: int) -> Tensor:
        out, lse = tiled_attention_forward(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale,
                                           block_q=block_q, block_k=block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (causal, attn_mask, _scale(q, scale), block_q, block_k)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        causal, attn_mask, sc, block_q, block_k = ctx.config
        delta = (dout * out).sum(dim=-1)
        shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        dq = torch.zeros(*shape, *q.shape[-2:], dtype=q.dtype, device=q.device)
        dk = torch.zeros(*shape, *k.shape[-2:], dtype=k.dtype, device=k.device)
        dv = torch.zeros(*shape, *v.shape[-2:], dtype=v.dtype, device=v.device)
        for q0, q1 in _blocks(q.shape[-2], block_q):
            for k0, k1 in _blocks(k.shape[-2], block_k):
                skip, allowed = _block_mask(causal, attn_mask, q0, q1, k0, k1, q.device)
                if skip:
                    continue
                gq, gk, gv = attention_block_backward(
                    q[..., q0:q1, :], k[..., k0:k1, :], v[..., k0:k1, :], dout[..., q0:q1, :],
                    lse[..., q0:q1], delta[..., q0:q1], sc, allowed)
                dq[..., q0:q1, :] += gq
                dk[..., k0:k1, :] += gk
                dv[..., k0:k1, :] += gv
        return _reduce_to(dq, q.shape), _reduce_to(dk, k.shape), _reduce_to(dv, v.shape), None, None, None, None, None


def tiled_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attn_mask: Tensor | None = None,
    scale: float | None = None, block_q: int = 64, block_k: int = 64,
) -> Tensor:
    """Attention through :class:`TiledAttention`; same arguments as :func:`tiled_attention_forward`."""
    return TiledAttention.apply(q, k, v, causal, attn_mask, scale, block_q, block_k)


# --------------------------------------------------------------------------------------------
# Measuring what each implementation keeps for backward
# --------------------------------------------------------------------------------------------

#: SDPA backends that can run on some platform, by the name the course uses
SDPA_BACKENDS = ("math", "flash", "efficient", "cudnn")


def _sdpa_context(backend: str) -> AbstractContextManager[Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "cudnn": "CUDNN_ATTENTION"}
    member = getattr(SDPBackend, names[backend], None)
    if member is None:
        raise RuntimeError(f"this torch has no SDPA backend {backend!r}")
    return sdpa_kernel([member])


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, backend: str | None = None) -> Tensor:
    """``F.scaled_dot_product_attention``, restricted to one backend (``None``: PyTorch's choice)."""
    with nullcontext() if backend is None else _sdpa_context(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def available_sdpa_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """The SDPA backends that run forward and backward here, for this device and dtype."""
    found = []
    q = torch.randn(1, 1, 8, 16, device=device, dtype=dtype, requires_grad=True)
    for backend in SDPA_BACKENDS:
        try:
            with warnings.catch_warnings():  # a backend that cannot run warns why, then raises
                warnings.simplefilter("ignore")
                sdpa(q, q, q, causal=True, backend=backend).sum().backward()
        except RuntimeError:
            continue
        found.append(backend)
    return found


def attention_impls(backends: list[str]) -> dict[str, Callable[..., Tensor]]:
    """Name -> ``fn(q, k, v, causal=...)`` for naive, each SDPA backend given, and tiled."""
    impls: dict[str, Callable[..., Tensor]] = {"naive": naive_attention}
    for b in backends:
        impls[f"sdpa[{b}]"] = lambda q, k, v, causal=False, b=b: sdpa(q, k, v, causal=causal, backend=b)
    impls["tiled"] = tiled_attention
    return impls


def saved_bytes_vs_length(
    impls: dict[str, Callable[..., Tensor]], lengths: list[int], *, batch: int = 1, heads: int = 1,
    head_dim: int = 16, causal: bool = True, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, list[int]]:
    """Bytes each implementation saves for backward at each sequence length (saved-tensor hooks).

    Everything autograd keeps is counted, the inputs ``q, k, v`` included (all of them keep those).
    """
    out: dict[str, list[int]] = {name: [] for name in impls}
    for t in lengths:
        q, k, v = (torch.randn(batch, heads, t, head_dim, dtype=dtype, device=device, requires_grad=True)
                   for _ in range(3))
        for name, fn in impls.items():
            out[name].append(saved_activation_bytes(fn, q, k, v, causal=causal).total)
    return out
