"""The MoE router, capacity, dropping and load-balancing loss against hand computations; the
MoE layer's output and gradients against a dense per-token reference; router collapse."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from course_lib.lessons.moe import train_router_usage
from course_lib.model import GPT, GPTConfig
from course_lib.moe import (
    MoEMLP,
    capacity,
    expert_ffn,
    load_balancing_loss,
    moe_flops_per_token,
    moe_params,
    route,
)


def logits_choosing(choices: list[list[int]], n_experts: int) -> torch.Tensor:
    """Router scores whose top-k are ``choices`` (first choice highest)."""
    logits = torch.zeros(len(choices), n_experts, dtype=torch.float64)
    for t, experts in enumerate(choices):
        for j, e in enumerate(experts):
            logits[t, e] = 3.0 - j
    return logits


def test_capacity_formula():
    assert capacity(6, 3, 1, 1.0) == 2
    assert capacity(4, 3, 2, 1.0) == 3  # ceil(8/3)
    assert capacity(10, 4, 2, 1.25) == math.ceil(1.25 * 10 * 2 / 4) == 7


def test_top1_routing_drops_what_overflows_in_token_order():
    r = route(logits_choosing([[0], [0], [0], [1], [2], [0]], 3), k=1, capacity_factor=1.0)
    assert r.capacity == 2
    assert r.expert.flatten().tolist() == [0, 0, 0, 1, 2, 0]
    assert r.position.flatten().tolist() == [0, 1, 2, 0, 0, 3]
    assert r.kept.flatten().tolist() == [True, True, False, True, True, False]
    assert r.dropped == 2 and r.tokens_per_expert.tolist() == [4, 1, 1]
    torch.testing.assert_close(r.gate, r.probs.gather(1, r.expert))  # k=1: the raw probability


def test_top2_serves_all_first_choices_before_second_choices():
    r = route(logits_choosing([[0, 1], [0, 2], [1, 0], [0, 1]], 3), k=2, capacity_factor=1.0)
    assert r.capacity == 3
    # expert 0 is full with three first choices, so token 2's second choice (expert 0) is dropped
    assert r.position.tolist() == [[0, 1], [1, 0], [0, 3], [2, 2]]
    assert r.kept.tolist() == [[True, True], [True, True], [True, False], [True, True]]
    assert r.dropped == 1
    torch.testing.assert_close(r.gate.sum(dim=1), torch.ones(4, dtype=torch.float64))  # renormalised


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    expert = probs.argmax(dim=1, keepdim=True)  # experts 0, 0, 2, 0
    f = [3 / 4, 0 / 4, 1 / 4]
    P = [(0.7 + 0.6 + 0.1 + 0.5) / 4, (0.2 + 0.3 + 0.1 + 0.4) / 4, (0.1 + 0.1 + 0.8 + 0.1) / 4]
    hand = 3 * sum(fi * pi for fi, pi in zip(f, P, strict=True))
    assert load_balancing_loss(probs, expert).item() == pytest.approx(hand, rel=1e-6)
    uniform = torch.full((6, 3), 1 / 3)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [0], [1], [2]])).item() == pytest.approx(1.0)
    # the gradient flows through P (probabilities), not through f (counts)
    p = probs.clone().requires_grad_()
    load_balancing_loss(p, expert).backward()
    torch.testing.assert_close(p.grad, torch.tensor(f).expand(4, 3) * 3 / 4)


def dense_reference(moe: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """Token by token: sum over its kept choices of gate * expert(token). No buffers, no scatter."""
    tokens = x.reshape(-1, x.size(-1))
    r = route(moe.router(tokens), moe.k, moe.capacity_factor)
    rows = []
    for t in range(tokens.size(0)):
        y = torch.zeros_like(tokens[t])
        for j in range(moe.k):
            if r.kept[t, j]:
                e = r.expert[t, j]
                y = y + r.gate[t, j] * expert_ffn(tokens[t:t + 1], moe.w_in[e], moe.b_in[e], moe.w_out[e], moe.b_out[e])[0]
        rows.append(y)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize("k,capacity_factor", [(1, 1.0), (2, 0.5), (2, 2.0)])
def test_moe_output_and_gradients_equal_a_dense_reference(k, capacity_factor):
    torch.manual_seed(0)
    moe = MoEMLP(8, 16, n_experts=4, k=k, capacity_factor=capacity_factor).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    go = torch.randn_like(x)
    out = moe(x)
    if capacity_factor < 1:
        assert moe.last_routing.dropped > 0  # the comparison covers dropped tokens
    grads = torch.autograd.grad(out, [*moe.parameters()], go)
    ref = dense_reference(moe, x)
    ref_grads = torch.autograd.grad(ref, [*moe.parameters()], go)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=0, atol=1e-12)


def test_a_dropped_token_passes_through_the_residual_of_a_gpt_block():
    torch.manual_seed(0)
    config = GPTConfig.from_preset("nano", vocab_size=20, block_size=8)
    model = GPT(config)
    for block in model.blocks:
        block.mlp = MoEMLP(config.n_embd, 4 * config.n_embd, n_experts=4, k=1, capacity_factor=0.5)
    ids = torch.randint(0, 20, (2, 8))
    out = model(ids, labels=ids.roll(-1, 1))
    assert out.logits.shape == (2, 8, 20) and torch.isfinite(out.loss)
    aux = sum(b.mlp.aux_loss for b in model.blocks)
    (out.loss + 0.01 * aux).backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0
    layer = model.blocks[0].mlp
    x = torch.randn(16, config.n_embd)
    y = layer(x)
    dropped = ~layer.last_routing.kept[:, 0]
    assert dropped.any() and (y[dropped] == 0).all()  # block output = x + 0 for those tokens


def test_flops_and_params_formulas_match_the_layer():
    moe = MoEMLP(16, 64, n_experts=8, k=2, capacity_factor=1.0)
    assert sum(p.numel() for p in moe.parameters()) == moe_params(16, 64, 8)
    x = torch.randn(32, 16)  # 32 tokens * 2 choices / 8 experts: capacity 8, no padding slots
    with FlopCounterMode(display=False) as counter:
        moe(x)
    assert counter.get_total_flops() == 32 * moe_flops_per_token(16, 64, 8, 2)
    with FlopCounterMode(display=False) as counter:
        MoEMLP(16, 64, n_experts=8, k=2, capacity_factor=2.0)(x)
    # capacity factor 2: every expert's buffer has 16 slots, half of them padding, all computed
    router, per_slot = 2 * 32 * 16 * 8, 2 * 2 * 16 * 64
    assert counter.get_total_flops() == router + 8 * 16 * per_slot


def test_k_must_be_one_or_two():
    with pytest.raises(ValueError, match="k must be"):
        MoEMLP(8, 8, 4, k=3)


@pytest.mark.slow
def test_router_collapses_without_the_balancing_loss_and_not_with_it():
    for seed in range(3):
        without = train_router_usage(seed, aux_coef=0.0)[-10:].mean(dim=0)
        with_aux = train_router_usage(seed, aux_coef=0.1)[-10:].mean(dim=0)
        assert without.max() > 0.6, (seed, without)  # one expert takes most tokens (4 experts)
        assert with_aux.max() < 0.35 and with_aux.min() > 0.15, (seed, with_aux)
