"""The tiny GPT (course_lib.model): loss, causality, parameter count, config validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.memory import num_param_tensors
from course_lib.model import GPT, IGNORE_INDEX, PRESETS, GPTConfig, closed_form_num_params


def _model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32), **kw})).eval()


def test_loss_equals_cross_entropy_by_hand_on_flattened_logits():
    model = _model()
    ids = torch.randint(0, 50, (3, 16))
    labels = torch.randint(0, 50, (3, 16))
    labels[0, 10:] = IGNORE_INDEX
    labels[2, :3] = IGNORE_INDEX
    out = model(ids, labels=labels)
    logits = out.logits.double().reshape(-1, 50)
    flat = labels.reshape(-1)
    keep = flat != IGNORE_INDEX
    log_probs = logits.log_softmax(-1)[keep].gather(1, flat[keep, None]).squeeze(1)
    by_hand = -log_probs.mean()
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    summed = model(ids, labels=labels, reduction="sum").loss
    assert summed.item() == pytest.approx(-log_probs.sum().item(), rel=1e-6)
    assert out.logits.shape == (3, 16, 50)
    # Errata 1: passing (B, T, V) logits unflattened treats T as the class axis: an error or a different number
    with pytest.raises((RuntimeError, ValueError)):
        F.cross_entropy(out.logits, labels, ignore_index=IGNORE_INDEX)


def test_changing_a_future_token_never_changes_earlier_logits():
    model = _model()
    ids = torch.randint(0, 50, (2, 16))
    base = model(ids).logits
    for t in (0, 5, 15):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        logits = model(changed).logits
        assert torch.equal(logits[:, :t], base[:, :t]), t  # bitwise: no information flows backwards
        assert not torch.allclose(logits[:, t], base[:, t])


def test_right_padding_with_attention_mask_leaves_real_positions_unchanged():
    model = _model()
    ids = torch.randint(0, 50, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, :10], model(ids).logits)


def test_masked_keys_never_reach_real_positions_with_left_padding():
    """With left padding the causal mask alone would let real tokens see the padding."""
    model = _model()
    ids = torch.randint(1, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # row 0 is left-padded by 5
    base = model(ids, attention_mask=mask).logits
    changed = ids.clone()
    changed[0, :5] = (changed[0, :5] + 7) % 50  # whatever the padding holds
    logits = model(changed, attention_mask=mask).logits
    torch.testing.assert_close(logits[0, 5:], base[0, 5:], rtol=0, atol=1e-6)
    assert torch.isfinite(logits).all(), "a padding query must not produce NaN"
    assert not torch.allclose(model(changed).logits[0, 5:], model(ids).logits[0, 5:])  # unmasked: it leaks


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("preset", ["nano", "tiny", "small"])
def test_parameter_count_equals_the_closed_form(preset, bias, tie):
    config = GPTConfig.from_preset(preset, vocab_size=97, bias=bias, tie_embeddings=tie)
    model = GPT(config)
    assert (model.lm_head.weight is model.wte.weight) == tie
    assert num_param_tensors(config) == len(list(model.parameters()))
    distinct = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.num_params() == distinct == closed_form_num_params(config)
    assert model.num_params(non_embedding=True) == distinct - 97 * config.n_embd - config.block_size * config.n_embd


def test_head_is_tied_to_the_embedding():
    model = _model()
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_embd=30, n_head=4), "n_head"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layer=-1), "n_layer"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_validation_says_what_to_change(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_divisibility_error_suggests_valid_widths():
    with pytest.raises(ValueError, match="n_embd=28 or 32"):
        GPTConfig(n_embd=30, n_head=4)


def test_bad_inputs_and_presets():
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("huge", vocab_size=10)
    model = _model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="labels shape"):
        model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long), reduction="none")
    assert set(PRESETS) >= {"nano", "tiny", "small", "gpt2"}


def test_flops_per_token_counts_six_n_plus_attention():
    model = _model()
    c = model.config
    n = model.num_params() - c.block_size * c.n_embd
    assert model.flops_per_token() == 6 * n + 12 * c.n_layer * c.n_embd * c.block_size
    assert model.flops_per_token(seq_len=8) < model.flops_per_token()


def test_initial_loss_is_near_uniform():
    model = _model()
    ids = torch.randint(0, 50, (4, 16))
    loss = model(ids, labels=torch.randint(0, 50, (4, 16))).loss.item()
    assert abs(loss - math.log(50)) < 0.2


def test_labels_that_are_the_inputs_are_refused_because_the_model_does_not_shift():
    model = _model()
    ids = torch.randint(0, 50, (2, 8))
    for same in (ids, ids[:], ids.view(2, 8)):  # the Hugging Face habit, also through a view
        with pytest.raises(ValueError, match="does not shift"):
            model(ids, labels=same)
    # what it would train: labels equal to the inputs reward copying position t to position t
    buf = torch.randint(0, 50, (2, 9))
    shifted = model(buf[:, :-1], labels=buf[:, 1:]).loss  # overlapping views of one buffer are fine
    assert torch.isfinite(shifted)
    copy = model(ids, labels=ids.clone()).loss  # an equal copy cannot be told apart; it is allowed
    assert torch.isfinite(copy)
