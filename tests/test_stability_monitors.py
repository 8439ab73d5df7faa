"""course_lib.stability: each monitor against a hand computation, and the spike counter."""

import math

import pytest
import torch

from course_lib.model import GPT, GPTConfig
from course_lib.stability import AttentionLogitMonitor, OutputLogitMonitor, UpdateRatioLogger, count_spikes


def _model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=30, block_size=12, n_layer=2, n_head=2, n_embd=16, **kw)).eval()


def _scores_by_hand(model, ids):
    """Largest causal |q.k|/sqrt(d) per block, from a forward written out by hand."""
    out = []
    x = model.embed(ids)
    T = ids.size(1)
    for block in model.blocks:
        h = block.ln_1(x)
        attn = block.attn
        q = attn.q_proj(h).view(1, T, 2, 8).transpose(1, 2)
        k = attn.k_proj(h).view(1, T, 2, 8).transpose(1, 2)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        s = q @ k.transpose(-2, -1) / math.sqrt(8)
        out.append(s[..., torch.ones(T, T, dtype=torch.bool).tril()].abs().max().item())
        x = block(x)
    return out


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_logit_monitor_records_the_largest_causal_score(qk_norm):
    model = _model(qk_norm=qk_norm)
    with torch.no_grad():
        model.blocks[1].attn.q_proj.weight.mul_(10)
    ids = torch.randint(0, 30, (1, 12))
    with AttentionLogitMonitor(model) as monitor, torch.no_grad():
        model(ids)
        monitor.log({}, step=1)
    expected = _scores_by_hand(model, ids)
    assert monitor.series("attn_logit/0") == pytest.approx([expected[0]], rel=1e-5)
    assert monitor.series("attn_logit/1") == pytest.approx([expected[1]], rel=1e-5)
    model(ids)  # hooks are gone after the with block: nothing new is recorded
    assert list(monitor.records) == [1]


def test_output_monitor_and_update_ratio_against_hand_computations():
    model = _model()
    ids = torch.randint(0, 30, (2, 12))
    with OutputLogitMonitor(model) as monitor:
        logits = model(ids).logits.detach()
        monitor.log({}, step=3)
    assert monitor.records[3]["logit_max"] == pytest.approx(logits.abs().max().item())
    assert monitor.records[3]["logsumexp"] == pytest.approx(logits.logsumexp(-1).mean().item(), rel=1e-6)

    ratio = UpdateRatioLogger(model)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    before = [p.detach().clone() for p in matrices]
    with torch.no_grad():
        for p in matrices:
            p.add_(0.01 * torch.randn_like(p))
    ratio.log({}, step=1)
    delta = math.sqrt(sum(((p - q) ** 2).sum().item() for p, q in zip(matrices, before, strict=True)))
    size = math.sqrt(sum((q**2).sum().item() for q in before))
    assert ratio.records[1]["update_ratio"] == pytest.approx(delta / size, rel=1e-5)
    ratio.log({}, step=2)  # no change since the last log
    assert ratio.records[2]["update_ratio"] == 0.0


def test_count_spikes():
    flat = [3.0] * 20
    assert count_spikes(flat) == 0
    spiky = flat[:12] + [4.5] + flat[13:]
    assert count_spikes(spiky) == 1
    assert count_spikes(flat[:15] + [float("nan")] + flat[16:]) == 1
    assert count_spikes([9.0] + flat) == 0  # the first window is not judged
    with pytest.raises(ValueError):
        count_spikes(flat, factor=1.0)


def test_final_loss_is_the_mean_of_the_last_losses_and_refuses_none():
    from course_lib.stability import final_loss

    assert final_loss([9.0, 1.0, 2.0, 3.0], last=3) == 2.0
    assert final_loss([4.0, 2.0]) == 3.0  # fewer than `last`: all of them
    with pytest.raises(ValueError, match="at least one loss"):
        final_loss([])
