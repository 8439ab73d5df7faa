"""Mixture of experts: a top-k router, capacity, the load-balancing loss, and an MoE MLP layer.

An MoE layer replaces one feed-forward network by ``n_experts`` of them and a **router** that
sends each token to ``k`` of them (softmax over the experts' scores, keep the ``k`` largest). The
parameters grow ``n_experts`` times; the compute per token grows only ``k`` times.

* **Gates.** With ``k = 1`` (Switch) the expert's output is scaled by its router probability
  ``p`` (not renormalised, or the router would get no gradient); with ``k = 2`` (GShard,
  Mixtral) by the two probabilities renormalised to sum to 1.
* **Capacity.** Each expert processes at most ``capacity = ceil(capacity_factor * tokens * k /
  n_experts)`` tokens (fixed buffer shapes). Assignments are served in order, all first choices
  before any second choice; the ones that overflow are **dropped**: that expert adds nothing for
  that token, whose representation passes unchanged through the residual connection.
* **Load balancing.** Without help the router collapses: the experts that get more tokens train
  faster, so the router sends them even more. The Switch/GShard auxiliary loss
  ``n_experts * sum_i f_i * P_i`` (``f_i``: fraction of assignments routed to expert ``i``,
  ``P_i``: mean router probability of ``i``) is 1 when routing is uniform and larger otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """Most tokens one expert processes: ``ceil(capacity_factor * n_tokens * k / n_experts)``."""
    return math.ceil(capacity_factor * n_tokens * k / n_experts)


@dataclass
class Routing:
    """Where each token goes. ``(T, k)`` tensors: choice ``j`` of token ``t``.

    Attributes:
        expert: the expert index.
        gate: the weight of that expert's output.
        position: the slot in that expert's buffer (order of arrival).
        kept: False where the expert was already full (the assignment is dropped).
        probs: ``(T, n_experts)`` router probabilities.
        aux_loss: the load-balancing loss ``n_experts * sum_i f_i * P_i``.
        capacity: slots per expert.
    """

    expert: torch.Tensor
    gate: torch.Tensor
    position: torch.Tensor
    kept: torch.Tensor
    probs: torch.Tensor
    aux_loss: torch.Tensor
    capacity: int

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """Assignments each expert received (before dropping), ``(n_experts,)``."""
        return torch.bincount(self.expert.flatten(), minlength=self.probs.size(-1))

    @property
    def dropped(self) -> int:
        """Number of assignments dropped for lack of capacity."""
        return int((~self.kept).sum())


def load_balancing_loss(probs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """``n_experts * sum_i f_i * P_i``: ``f_i`` fraction of the ``(T, k)`` assignments to ``i`` (no
    gradient: a count), ``P_i`` mean of ``probs[:, i]`` over tokens (carries the gradient)."""
    n_experts = probs.size(-1)
    f = torch.bincount(expert.flatten(), minlength=n_experts).to(probs.dtype) / expert.numel()
    return n_experts * (f * probs.mean(dim=0)).sum()


def route(logits: torch.Tensor, k: int, capacity_factor: float) -> Routing:
    """Top-``k`` routing of ``(T, n_experts)`` router scores with a capacity per expert."""
    if k not in (1, 2):
        raise ValueError(f"k must be 1 or 2, got {k!r}")
    n_tokens, n_experts = logits.shape
    probs = logits.softmax(dim=-1)
    top_p, expert = probs.topk(k, dim=-1)
    gate = top_p if k == 1 else top_p / top_p.sum(dim=-1, keepdim=True)
    # Order of service: all first choices (token order), then all second choices.
    order = expert.t().flatten()  # (k*T,)
    one_hot = F.one_hot(order, n_experts)
    position = ((one_hot.cumsum(dim=0) - 1) * one_hot).sum(dim=-1).view(k, n_tokens).t()
    cap = capacity(n_tokens, n_experts, k, capacity_factor)
    return Routing(expert=expert, gate=gate, position=position, kept=position < cap, probs=probs,
                   aux_loss=load_balancing_loss(probs, expert), capacity=cap)


def expert_ffn(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
               b_out: torch.Tensor) -> torch.Tensor:
    """One expert (or a batch of them, leading dims broadcast): ``gelu(x @ w_in + b_in) @ w_out + b_out``."""
    return F.gelu(x @ w_in + b_in.unsqueeze(-2), approximate="tanh") @ w_out + b_out.unsqueeze(-2)


class MoEMLP(nn.Module):
    """A drop-in replacement for a transformer block's MLP: ``(B, T, d_model) -> (B, T, d_model)``.

    ``block.mlp = MoEMLP(...)`` is all a GPT needs: ``forward`` returns a tensor, and the
    load-balancing loss of the last forward is kept in ``self.aux_loss`` (add
    ``coef * sum(m.aux_loss for m in moe_layers)`` to the training loss), its routing in
    ``self.last_routing``.

    Args:
        d_model: width of the token representations.
        d_hidden: hidden width of each expert.
        n_experts: number of experts.
        k: experts per token (1 or 2).
        capacity_factor: slack of each expert's buffer over a perfectly even split (1.0: none).
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, k: int = 1, capacity_factor: float = 1.25) -> None:
        super().__init__()
        if k not in (1, 2) or k > n_experts:
            raise ValueError(f"k must be 1 or 2 and at most n_experts={n_experts}, got {k!r}")
        self.n_experts, self.k, self.capacity_factor = n_experts, k, capacity_factor
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(n_experts, d_model, d_hidden) * 0.02)
        self.b_in = nn.Parameter(torch.zeros(n_experts, d_hidden))
        self.w_out = nn.Parameter(torch.randn(n_experts, d_hidden, d_model) * 0.02)
        self.b_out = nn.Parameter(torch.zeros(n_experts, d_model))
        self.aux_loss: torch.Tensor | None = None
        self.last_routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.size(-1))
        r = route(self.router(tokens), self.k, self.capacity_factor)
        self.aux_loss, self.last_routing = r.aux_loss, r
        # Dispatch: kept assignments into an (n_experts, capacity, d) buffer, one row per slot.
        slot = (r.expert * r.capacity + r.position)[r.kept]
        token = torch.arange(tokens.size(0), device=x.device).unsqueeze(1).expand_as(r.expert)[r.kept]
        buffer = tokens.new_zeros(self.n_experts * r.capacity, tokens.size(-1)).index_copy(0, slot, tokens[token])
        out = expert_ffn(buffer.view(self.n_experts, r.capacity, -1), self.w_in, self.b_in, self.w_out, self.b_out)
        # Combine: each kept assignment adds gate * expert output to its token; dropped ones add 0.
        contrib = out.reshape(-1, out.size(-1))[slot] * r.gate[r.kept].unsqueeze(-1)
        return torch.zeros_like(tokens).index_add(0, token, contrib).view_as(x)


def moe_params(d_model: int, d_hidden: int, n_experts: int) -> int:
    """Parameters of an :class:`MoEMLP` (router + experts with biases)."""
    return d_model * n_experts + n_experts * (2 * d_model * d_hidden + d_hidden + d_model)


def moe_flops_per_token(d_model: int, d_hidden: int, n_experts: int, k: int) -> int:
    """Forward matmul FLOPs per token: the router plus ``k`` experts (2 FLOPs per multiply-add)."""
    return 2 * d_model * n_experts + k * 2 * (2 * d_model * d_hidden)
