"""GPTConfig's stability options: QK-norm, z-loss and logit soft-capping."""

import pytest
import torch

from course_lib.model import GPT, IGNORE_INDEX, GPTConfig, closed_form_num_params

BASE = dict(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)


def _model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**BASE, **kw})).eval()


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (3, 16), generator=g)
    labels = torch.randint(0, 40, (3, 16), generator=g)
    labels[1, 9:] = IGNORE_INDEX
    return ids, labels


def test_z_loss_adds_the_squared_log_normaliser_of_scored_positions():
    ids, labels = _batch()
    coef = 1e-2
    model = _model(z_loss=coef)
    out = model(ids, labels=labels)
    logits = out.logits.double().reshape(-1, 40)
    flat = labels.reshape(-1)
    keep = flat != IGNORE_INDEX
    log_probs = logits.log_softmax(-1)[keep].gather(1, flat[keep, None]).squeeze(1)
    lse = logits[keep].logsumexp(-1)
    by_hand = -log_probs.mean() + coef * (lse**2).mean()
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    summed = model(ids, labels=labels, reduction="sum").loss
    assert summed.item() == pytest.approx((-log_probs.sum() + coef * (lse**2).sum()).item(), rel=1e-6)
    # and it is a real change: without the z-loss the same weights give plain cross-entropy
    plain = _model()(ids, labels=labels).loss
    assert out.loss.item() - plain.item() == pytest.approx(coef * (lse**2).mean().item(), rel=1e-5)


def test_z_loss_gradient_pulls_the_normaliser_towards_one():
    ids, labels = _batch()
    lse = {}
    for coef in (0.0, 1.0):
        model = _model(z_loss=coef)
        with torch.no_grad():
            model.lm_head.weight.mul_(20)  # large logits: logsumexp far from 0
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        for _ in range(5):
            opt.zero_grad()
            model(ids, labels=labels).loss.backward()
            opt.step()
        lse[coef] = model(ids).logits.logsumexp(-1).abs().mean().item()
    assert lse[1.0] < 0.6 * lse[0.0], lse


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    ids, _ = _batch()
    for qk_norm in (False, True):
        model = _model(qk_norm=qk_norm)
        before = model(ids).logits
        with torch.no_grad():
            for block in model.blocks:
                for proj in (block.attn.q_proj, block.attn.k_proj):
                    proj.weight.mul_(30)
                    proj.bias.mul_(30)
        after = model(ids).logits
        same = torch.allclose(before, after, atol=1e-4)
        assert same == qk_norm, qk_norm


def test_qk_norm_parameters_have_the_head_shape_and_are_counted():
    config = GPTConfig(**BASE, qk_norm=True)
    model = GPT(config)
    attn = model.blocks[0].attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (32 // 2,)
    assert model.num_params() == closed_form_num_params(config)
    assert closed_form_num_params(config) - closed_form_num_params(GPTConfig(**BASE)) == 2 * 2 * 2 * 16


def test_logit_softcap_bounds_the_logits_smoothly():
    ids, _ = _batch()
    raw = _model()
    capped = _model(logit_softcap=0.05)
    raw_logits = raw(ids).logits
    logits = capped(ids).logits
    assert logits.abs().max() <= 0.05  # tanh saturates to exactly 1 in float32
    torch.testing.assert_close(logits, 0.05 * torch.tanh(raw_logits / 0.05))


@pytest.mark.parametrize("bad, match", [
    (dict(z_loss=-1.0), "z_loss"),
    (dict(logit_softcap=0.0), "logit_softcap"),
    (dict(mup_base_width=5), "mup_base_width"),
])
def test_bad_options_are_refused_with_the_reason(bad, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**BASE, **bad})


def test_the_memory_estimate_refuses_options_it_does_not_model():
    from course_lib.memory import estimate_training_memory

    with pytest.raises(ValueError, match="qk_norm.*saved_activation_bytes"):
        estimate_training_memory(GPTConfig(**BASE, qk_norm=True), batch_size=2)
    with pytest.raises(ValueError, match="tie_embeddings.*saved_activation_bytes"):
        estimate_training_memory(GPTConfig(**BASE, tie_embeddings=False), batch_size=2)


def test_a_float64_model_computes_its_loss_in_float64():
    ids, labels = _batch()
    model = _model().double()
    loss = model(ids, labels=labels).loss
    assert loss.dtype == torch.float64


@pytest.mark.parametrize("options", [dict(qk_norm=True), dict(mup_base_width=16, logit_softcap=5.0)])
def test_kv_cache_generation_equals_the_recomputing_path_with_the_options(options):
    model = _model(**options)
    prompt = torch.randint(0, 40, (2, 5))
    cached = model.generate(prompt, max_new_tokens=8, temperature=0)
    recomputed = model.generate(prompt, max_new_tokens=8, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
