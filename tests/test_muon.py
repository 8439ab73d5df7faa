"""Muon: Newton-Schulz orthogonalisation and the optimizer built on it."""

import pytest
import torch

from course_lib.model import GPT, GPTConfig
from course_lib.muon import CUBIC, Muon, muon_param_groups, newton_schulz


@pytest.mark.parametrize("shape", [(16, 16), (24, 8), (8, 40)])
def test_cubic_iteration_converges_to_the_polar_factor(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    X = newton_schulz(G, steps=60, coefficients=CUBIC)
    torch.testing.assert_close(X, U @ Vh, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 96)])
def test_quintic_five_steps_puts_every_singular_value_near_one(shape):
    """Singular values spread over two decades (condition number 100) all land in [0.6, 1.25]."""
    g = torch.Generator().manual_seed(1)
    n = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(shape[1], n, generator=g))
    G = U @ torch.diag(torch.logspace(0, -2, n)) @ V.T
    X = newton_schulz(G)
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    # the same singular vectors as the input: X is close to the polar factor U V^T
    polar = U @ V.T
    assert (X * polar).sum() / (X.norm() * polar.norm()) > 0.98


def test_muon_step_equals_the_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 6))
    w0 = w.detach().clone()
    opt = Muon([w], lr=0.1, momentum=0.9, weight_decay=0.01)
    grads = [torch.randn(12, 6) for _ in range(2)]
    buf = torch.zeros(12, 6)
    expected = w0.clone()
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
        buf = 0.9 * buf + grad
        update = newton_schulz(grad + 0.9 * buf)
        expected = expected * (1 - 0.1 * 0.01) - 0.1 * (12 / 6) ** 0.5 * update
    torch.testing.assert_close(w.detach(), expected)


def test_the_adamw_groups_equal_torch_adamw():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=2, n_head=2, n_embd=16)).double()
    reference = GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=2, n_head=2, n_embd=16)).double()
    reference.load_state_dict(model.state_dict())
    groups = muon_param_groups(model, lr=0.02, adam_lr=3e-3, weight_decay=0.1)
    opt = Muon(groups)
    adam_names = {n for n, p in model.named_parameters()
                  if not any(p is q for g in groups if g["use_muon"] for q in g["params"])}
    ref_params = dict(reference.named_parameters())
    ref_opt = torch.optim.AdamW([
        {"params": [ref_params[n] for n in sorted(adam_names) if ref_params[n].dim() >= 2], "weight_decay": 0.1},
        {"params": [ref_params[n] for n in sorted(adam_names) if ref_params[n].dim() < 2], "weight_decay": 0.0},
    ], lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.randint(0, 30, (4, 8))
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(ids, labels=ids.roll(-1, 1)).loss.backward()
            o.step()
        # the reference leaves the hidden matrices alone: copy Muon's so both see the same model
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n not in adam_names:
                    ref_params[n].copy_(p)
    for n in adam_names:
        torch.testing.assert_close(dict(model.named_parameters())[n], ref_params[n], rtol=1e-10, atol=1e-12)


def test_muon_refuses_vectors_and_param_groups_split_the_gpt():
    with pytest.raises(ValueError, match="use_muon=False"):
        Muon([torch.nn.Parameter(torch.zeros(4))])
    model = GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=2, n_head=2, n_embd=16))
    groups = muon_param_groups(model)
    hidden = groups[0]["params"]
    assert groups[0]["use_muon"] and all(p.dim() == 2 for p in hidden) and len(hidden) == 2 * 6
    assert any(p is model.wte.weight for g in groups[1:] for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert groups[-1]["weight_decay"] == 0.0
