"""The memory estimator against real tensors, and gradient checkpointing that keeps the weights."""

import copy

import pytest
import torch

from course_lib.memory import (
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    estimate_training_memory,
    is_checkpointed,
    memory_breakdown,
    num_param_tensors,
    saved_activation_bytes,
    state_bytes,
)
from course_lib.model import GPT, GPTConfig

CONFIGS = {
    "4x64": (GPTConfig(vocab_size=65, n_layer=4, n_head=4, n_embd=64, block_size=64), 4, 64),
    "2x32-nobias-dropout": (
        GPTConfig(vocab_size=100, n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, dropout=0.1), 3, 24,
    ),
}
OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-3),
}


def _batch(config, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, config.vocab_size, (B, T), generator=g),
            torch.randint(0, config.vocab_size, (B, T), generator=g))


def test_breakdown_matches_zero_paper():
    # ZeRO (Rajbhandari et al. 2020), section 3.1: a 7.5B-parameter model trained with mixed-precision
    # Adam needs 2+2+12 = 16 bytes per parameter, "at least 120 GB"
    b = memory_breakdown(7.5e9, "adam", "mixed")
    assert b["total"] == pytest.approx(120e9)
    assert (b["weights"], b["gradients"], b["optimizer"]) == (15e9, 15e9, 90e9)
    assert memory_breakdown(1, "sgd", "fp32")["total"] == 8
    assert memory_breakdown(1, "sgd_momentum", "mixed")["total"] == 2 + 2 + 4 + 4
    with pytest.raises(ValueError, match="optimizer must be one of"):
        memory_breakdown(1, "lion")


def test_param_tensor_count_matches_model():
    for config, _, _ in CONFIGS.values():
        assert num_param_tensors(config) == len(list(GPT(config).parameters()))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("precision", ["fp32", "autocast"])
def test_state_bytes_exact_after_a_real_step(name, optimizer, precision):
    config, B, T = CONFIGS[name]
    model = GPT(config)
    opt = OPTIMIZERS[optimizer](model.parameters())
    ids, labels = _batch(config, B, T)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        loss = model(ids, labels=labels).loss
    loss.backward()
    opt.step()
    measured = state_bytes(model, opt)
    est = estimate_training_memory(config, B, T, optimizer=optimizer, precision=precision)
    assert measured == {"weights": est.weights, "gradients": est.gradients, "optimizer": est.optimizer}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("precision", ["fp32", "autocast"])
@pytest.mark.parametrize("checkpointing", [False, True, 2])
def test_activation_estimate_within_25_percent(name, precision, checkpointing):
    config, B, T = CONFIGS[name]
    model = GPT(config)
    if checkpointing:
        enable_gradient_checkpointing(model, every=1 if checkpointing is True else checkpointing)
    ids, labels = _batch(config, B, T)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        measured = saved_activation_bytes(model, ids, labels=labels).total
    est = estimate_training_memory(config, B, T, precision=precision, checkpointing=checkpointing).activations
    assert abs(est - measured) / measured < 0.25, (est, measured)


def test_saved_bytes_count_shared_storage_once():
    x = torch.randn(1000, requires_grad=True)
    # x * x saves x twice (as both operands); exp saves its output; the view shares x's storage
    m = saved_activation_bytes(lambda t: (t * t).sum() + t.view(10, 100).exp().sum(), x)
    assert m.total == 2 * x.nbytes and m.n_tensors == 2
    # a parameter is not an activation
    lin = torch.nn.Linear(10, 10, bias=False)
    inp = torch.randn(4, 10)
    assert saved_activation_bytes(lin, inp).total == inp.nbytes


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_same_outputs_and_gradients(every):
    config = GPTConfig(vocab_size=65, n_layer=4, n_head=4, n_embd=64, block_size=32, dropout=0.1)
    plain = GPT(config)
    wrapped = copy.deepcopy(plain)
    params_before = {n: p for n, p in wrapped.named_parameters()}
    enable_gradient_checkpointing(wrapped, every=every)
    # Errata 5: the same parameter objects and state_dict keys, nothing re-initialised
    assert {n: p for n, p in wrapped.named_parameters()} == params_before
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    assert [is_checkpointed(b) for b in wrapped.blocks] == [i % every == 0 for i in range(4)]
    ids, labels = _batch(config, 2, 32)
    outs = []
    for model in (plain, wrapped):
        torch.manual_seed(1)  # same dropout masks; the checkpoint replays the RNG in recomputation
        out = model(ids, labels=labels)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=0, atol=1e-6)
    g0, g1 = _grads(plain), _grads(wrapped)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=1e-6, msg=n)
    disable_gradient_checkpointing(wrapped)
    assert not any(is_checkpointed(b) for b in wrapped.blocks)


def test_checkpointing_halves_saved_activations():
    config = GPTConfig(vocab_size=65, n_layer=4, n_head=4, n_embd=64, block_size=64)
    model = GPT(config)
    ids, labels = _batch(config, 4, 64)
    before = saved_activation_bytes(model, ids, labels=labels)
    enable_gradient_checkpointing(model)
    after = saved_activation_bytes(model, ids, labels=labels)
    assert after.total <= before.total / 2
    # each checkpointed block keeps exactly its input (B, T, d) in fp32
    for i in range(4):
        assert after.by_module[f"blocks.{i}"] == 4 * 64 * 64 * 4


def test_bad_arguments_are_explained():
    config = GPTConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=32, block_size=32)
    with pytest.raises(ValueError, match="exceeds block_size"):
        estimate_training_memory(config, 1, 64)
    with pytest.raises(ValueError, match="precision must be one of"):
        estimate_training_memory(config, 1, 8, precision="fp8")
    with pytest.raises(ValueError, match="positive integer"):
        enable_gradient_checkpointing(GPT(config), every=0)
    with pytest.raises(TypeError, match="blocks"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("fc_in",), ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out")])
@pytest.mark.parametrize("precision", ["fp32", "autocast"])
def test_lora_estimate_against_measurement(targets, precision):
    from course_lib.lora import apply_lora

    config, B, T = CONFIGS["4x64"]
    model = apply_lora(GPT(config), rank=4, alpha=8, target_modules=targets)
    ids, labels = _batch(config, B, T)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        measured = saved_activation_bytes(model, ids, labels=labels).total
        loss = model(ids, labels=labels).loss
    loss.backward()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    opt.step()
    est = estimate_training_memory(config, B, T, precision=precision, lora_rank=4, lora_targets=targets)
    assert state_bytes(model, opt) == {"weights": est.weights, "gradients": est.gradients, "optimizer": est.optimizer}
    assert abs(est.activations - measured) / measured < 0.25, (est.activations, measured)
    # a frozen base keeps fewer activations than full training
    assert measured < estimate_training_memory(config, B, T, precision=precision).activations


@pytest.mark.parametrize("part", ["attn", "mlp"])
def test_selective_checkpointing_saves_less_than_the_block_and_keeps_the_gradients(part):
    import copy

    from course_lib.memory import (
        disable_gradient_checkpointing,
        enable_gradient_checkpointing,
        saved_activation_bytes,
    )
    from course_lib.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16))
    ids = torch.randint(0, 50, (4, 16))
    plain = saved_activation_bytes(model, ids, labels=ids.roll(-1, 1)).total
    whole = saved_activation_bytes(enable_gradient_checkpointing(copy.deepcopy(model)), ids, labels=ids.roll(-1, 1)).total
    selective = enable_gradient_checkpointing(copy.deepcopy(model), part=part)
    some = saved_activation_bytes(selective, ids, labels=ids.roll(-1, 1)).total
    assert whole < some < plain
    model(ids, labels=ids.roll(-1, 1)).loss.backward()
    selective(ids, labels=ids.roll(-1, 1)).loss.backward()
    for (name, p), q in zip(model.named_parameters(), selective.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    disable_gradient_checkpointing(selective)
    assert saved_activation_bytes(selective, ids, labels=ids.roll(-1, 1)).total == plain
    with pytest.raises(ValueError, match="part"):
        enable_gradient_checkpointing(model, part="ln")
