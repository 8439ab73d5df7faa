"""Tiled online-softmax attention against F.scaled_dot_product_attention (float64), and its memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from course_lib.attention import (
    attention_impls,
    available_sdpa_backends,
    naive_attention,
    online_softmax_finish,
    online_softmax_init,
    online_softmax_update,
    saved_bytes_vs_length,
    tiled_attention,
    tiled_attention_forward,
)
from course_lib.memory import saved_activation_bytes


def _qkv(b: int, h: int, t: int, d: int, seed: int = 0, tk: int | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, t, d), (b, h, tk or t, d), (b, h, tk or t, d)]
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,block_q,block_k", [(37, 8, 8), (50, 16, 7), (64, 64, 64), (5, 16, 16)])
def test_forward_and_gradients_equal_sdpa(causal: bool, t: int, block_q: int, block_k: int) -> None:
    q, k, v = _qkv(2, 3, t, 8)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = tiled_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    dout = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_naive_equals_sdpa(causal: bool) -> None:
    q, k, v = _qkv(2, 2, 30, 8, seed=8)
    torch.testing.assert_close(naive_attention(q, k, v, causal=causal),
                               F.scaled_dot_product_attention(q, k, v, is_causal=causal), rtol=0, atol=1e-12)


def test_rectangular_and_mask_equal_sdpa() -> None:
    """Fewer queries than keys, with a boolean mask (True = may attend) as SDPA takes it."""
    q, k, v = _qkv(1, 2, 19, 4, seed=1, tk=33)
    mask = torch.rand(19, 33, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[:, 0] = True  # every row keeps a key, so SDPA's output is defined the same way everywhere
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = tiled_attention(q, k, v, attn_mask=mask, block_q=8, block_k=10)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    dout = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_gradcheck() -> None:
    q, k, v = _qkv(1, 1, 9, 3, seed=3)
    assert torch.autograd.gradcheck(lambda q, k, v: tiled_attention(q, k, v, causal=True, block_q=4, block_k=3),
                                    (q, k, v))


def test_lse_is_the_log_sum_exp_of_each_row() -> None:
    q, k, v = _qkv(1, 2, 21, 4, seed=4)
    _, lse = tiled_attention_forward(q, k, v, causal=True, block_q=5, block_k=6)
    s = (q @ k.transpose(-2, -1)) / 2.0
    s = s.masked_fill(~torch.ones(21, 21, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1), rtol=0, atol=1e-12)


def test_online_softmax_over_blocks_equals_softmax() -> None:
    """The recurrence itself, one key block at a time, equals softmax(s) @ v over all keys."""
    g = torch.Generator().manual_seed(5)
    s, v = torch.randn(4, 12, generator=g, dtype=torch.float64) * 5, torch.randn(12, 3, generator=g, dtype=torch.float64)
    state = online_softmax_init(torch.zeros(4, 3, dtype=torch.float64))
    for j in range(0, 12, 5):
        state = online_softmax_update(state, s[:, j:j + 5], v[j:j + 5])
    out, lse = online_softmax_finish(state)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=0, atol=1e-12)


def test_fully_masked_row_gives_zeros_not_nan() -> None:
    """Left padding + causal: the first query rows may attend to no key at all."""
    t = 10
    q, k, v = _qkv(1, 2, t, 4, seed=6)
    keys_real = torch.arange(t) >= 3  # keys 0..2 are padding
    mask = keys_real[None, :].expand(t, t)
    naive = naive_attention(q, k, v, causal=True, attn_mask=mask)
    assert torch.isnan(naive[..., :3, :]).all()  # the pitfall: softmax over all -inf is NaN
    out = tiled_attention(q, k, v, causal=True, attn_mask=mask, block_q=4, block_k=4)
    assert torch.equal(out[..., :3, :], torch.zeros_like(out[..., :3, :]))
    allowed = mask & torch.ones(t, t, dtype=torch.bool).tril()
    torch.testing.assert_close(out[..., 3:, :], naive[..., 3:, :], rtol=0, atol=1e-12)
    _, lse = tiled_attention_forward(q, k, v, causal=True, attn_mask=mask, block_q=4, block_k=4)
    assert torch.isneginf(lse[..., :3]).all() and torch.isfinite(lse[..., 3:]).all()
    out.square().sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert torch.equal(q.grad[..., :3, :], torch.zeros_like(q.grad[..., :3, :]))
    assert allowed[:3].sum() == 0


def test_tiled_saves_only_q_k_v_out_lse() -> None:
    q, k, v = _qkv(2, 3, 40, 8, seed=7)
    saved = saved_activation_bytes(lambda: tiled_attention(q, k, v, causal=True, block_q=16, block_k=16),
                                   exclude=[q, k, v])
    assert saved.n_tensors == 2  # out and lse: nothing of size T x T
    assert saved.total == 2 * 3 * 40 * (8 + 1) * 8


def test_saved_bytes_linear_for_tiled_quadratic_for_naive() -> None:
    lengths = [256, 512, 1024]
    backends = available_sdpa_backends()
    assert "math" in backends
    res = saved_bytes_vs_length(attention_impls(backends), lengths, heads=2, head_dim=16)
    for name, b in res.items():
        ratios = [b[i + 1] / b[i] for i in range(len(b) - 1)]
        if name in ("tiled", "sdpa[flash]", "sdpa[efficient]", "sdpa[cudnn]"):
            assert ratios == [2.0, 2.0], (name, ratios)  # linear in T exactly
        else:
            assert all(r > 3.6 for r in ratios), (name, ratios)  # the T x T matrix dominates: -> 4
    # q, k, v, out (fp32) and the fp32 log-sum-exp per row: (4 d + 1) * 4 bytes per token per head
    assert res["tiled"] == [2 * t * (4 * 16 + 1) * 4 for t in lengths]
    # naive keeps at least one T x T fp32 matrix per head
    assert all(n >= 2 * t * t * 4 for n, t in zip(res["naive"], lengths, strict=True))
