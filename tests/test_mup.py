"""muP: the model at its base width is the standard model, and the coordinate check tells them apart."""

import pytest
import torch

from course_lib.model import GPT, GPTConfig
from course_lib.mup import coordinate_check, mup_param_groups, passes_coordinate_check, width_slopes

V = 64
WIDTHS = (32, 64, 128, 256)


def _config(width, base=None):
    return GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=width, mup_base_width=base)


def _batches(n=5):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (8, 32), generator=g)
        out.append({"input_ids": ids, "labels": torch.roll(ids, -1, 1)})
    return out


def test_at_the_base_width_mup_equals_the_standard_model():
    ids = _batches(1)[0]["input_ids"]
    torch.manual_seed(0)
    sp = GPT(_config(64))
    torch.manual_seed(0)
    mup = GPT(_config(64, base=64))
    torch.testing.assert_close(mup(ids).logits, sp(ids).logits, rtol=0, atol=1e-6)
    assert [g["lr"] for g in mup_param_groups(mup, 1e-3)] == [1e-3, 1e-3, 1e-3]


def test_mup_scales_hidden_learning_rates_and_init_by_the_width():
    torch.manual_seed(0)
    model = GPT(_config(256, base=64))
    groups = mup_param_groups(model, 1e-2, weight_decay=0.1)
    hidden, matrices, vectors = groups
    assert hidden["lr"] == pytest.approx(1e-2 / 4) and matrices["lr"] == vectors["lr"] == 1e-2
    assert vectors["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # hidden init std: 0.02 * sqrt(64 / 256) = 0.01; the embedding keeps 0.02
    assert model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.slow
def test_coordinate_check_fails_for_standard_and_passes_for_mup():
    batches = _batches()
    sp = width_slopes(WIDTHS, coordinate_check(lambda w: _config(w), WIDTHS, batches, lr=1e-2))
    mup = width_slopes(WIDTHS, coordinate_check(lambda w: _config(w, base=32), WIDTHS, batches, lr=1e-2))
    assert not passes_coordinate_check(sp)
    assert sp["block 1"] > 1.0  # hidden activations blow up with width under SP
    assert passes_coordinate_check(mup), mup


@pytest.mark.slow
def test_the_muP_model_without_its_per_layer_learning_rates_fails_the_check():
    sizes = coordinate_check(lambda w: _config(w, base=32), WIDTHS, _batches(), lr=1e-2, per_layer_lr=False)
    slopes = width_slopes(WIDTHS, sizes)
    assert not passes_coordinate_check(slopes)
    assert slopes["block 1"] > 1.0


def test_an_untied_head_is_its_own_matrix_in_the_embeddings_learning_rate_group():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=128, mup_base_width=32,
                          tie_embeddings=False))
    assert model.lm_head.weight is not model.wte.weight
    ids = _batches(1)[0]
    model(ids["input_ids"], labels=ids["labels"]).loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0 and model.wte.weight.grad.abs().sum() > 0
    unused = sorted(set(range(V)) - set(ids["input_ids"].flatten().tolist()))
    assert unused, "the test needs a token the batch does not contain"
    # untied, an embedding row of a token never seen as input gets no gradient; its head row does
    assert model.wte.weight.grad[unused].abs().sum() == 0 < model.lm_head.weight.grad[unused].abs().sum()
    hidden, matrices, vectors = mup_param_groups(model, 1e-2)
    assert any(p is model.lm_head.weight for p in matrices["params"]) and matrices["lr"] == 1e-2
    assert hidden["lr"] == pytest.approx(1e-2 / 4)
