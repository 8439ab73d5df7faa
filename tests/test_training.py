"""The training loop: token-weighted accumulation, exact resume, partial windows, config errors."""

import copy
import math

import pytest
import torch
from training_helpers import CrashAt as _CrashAt
from training_helpers import Interleave as _Interleave
from training_helpers import tiny_model as _model

from course_lib.checkpoint import latest_checkpoint, load_checkpoint
from course_lib.data import RandomWindowBatches
from course_lib.model import GPT, IGNORE_INDEX, GPTConfig
from course_lib.training import TrainConfig, accumulate_gradients, evaluate, make_optimizer, train

V = 40


def _padded_batch(lengths, T=16, seed=0):
    """A batch whose row i has ``lengths[i]`` real tokens, then padding labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (len(lengths), T), generator=g)
    labels = torch.randint(0, V, (len(lengths), T), generator=g)
    for row, n in enumerate(lengths):
        labels[row, n:] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_gradient_equals_full_batch_gradient():
    # three micro-batches with very different numbers of real tokens (16, 3+5, 1+16+9)
    micro = [_padded_batch([16], seed=1), _padded_batch([3, 5], seed=2), _padded_batch([1, 16, 9], seed=3)]
    full = {k: torch.cat([m[k] for m in micro]) for k in ("input_ids", "labels")}

    reference = _model().double()
    reference(full["input_ids"], labels=full["labels"]).loss.backward()  # mean over all real tokens
    expected = _grads(reference)

    model = _model().double()
    loss = accumulate_gradients(model, micro)
    got = _grads(model)
    assert loss == pytest.approx(reference(full["input_ids"], labels=full["labels"]).loss.item(), rel=1e-6)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-6, msg=name)

    # Errata 7: averaging each micro-batch's mean loss gives a different gradient
    naive = _model().double()
    for m in micro:
        (naive(m["input_ids"], labels=m["labels"]).loss / len(micro)).backward()
    assert not torch.allclose(_grads(naive)["wte.weight"], expected["wte.weight"], atol=1e-6)


def test_accumulation_in_float32_matches_within_1e6():
    micro = [_padded_batch([16, 2], seed=4), _padded_batch([7], seed=5)]
    full = {k: torch.cat([m[k] for m in micro]) for k in ("input_ids", "labels")}
    reference = _model()
    reference(full["input_ids"], labels=full["labels"]).loss.backward()
    model = _model()
    accumulate_gradients(model, micro)
    for name, g in _grads(reference).items():
        torch.testing.assert_close(_grads(model)[name], g, rtol=1e-5, atol=1e-6, msg=name)


def _stream(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a learnable stream: mostly counting upwards modulo V, with some noise
    base = torch.arange(n) % V
    noise = torch.randint(0, V, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.8
    return torch.where(keep, base, noise).long()


def _config(tmp_path, **kw):
    base = dict(steps=12, lr=3e-3, warmup_steps=3, grad_accum=2, checkpoint_every=4, keep_checkpoints=3,
                out_dir=str(tmp_path), progress=False, seed=7)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    stream = _stream()
    full = train(_model(dropout=0.1), RandomWindowBatches(stream, 16, 4, seed=3), _config(tmp_path / "a"))

    with pytest.raises(KeyboardInterrupt):  # crash after the step-4 checkpoint, mid-way to step 8
        train(_model(dropout=0.1), RandomWindowBatches(stream, 16, 4, seed=3), _config(tmp_path / "b"),
              loggers=[_CrashAt(6)])
    assert latest_checkpoint(tmp_path / "b").name == "ckpt_00000004.pt"

    # a new process would build a fresh model (other init) and a fresh iterator at position 0
    resumed_model = _model(seed=123, dropout=0.1)
    resumed = train(resumed_model, RandomWindowBatches(stream, 16, 4, seed=3), _config(tmp_path / "b"), resume=True)
    assert resumed.resumed_from == 4 and resumed.step == 12
    assert [r["step"] for r in resumed.history] == list(range(5, 13))
    assert resumed.values("loss") == full.values("loss")[4:]  # bitwise: == on floats
    assert resumed.values("grad_norm") == full.values("grad_norm")[4:]
    a = load_checkpoint(latest_checkpoint(tmp_path / "a"))["model"]
    b = resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.values("loss")[-1] < full.values("loss")[0]  # it did learn something


@pytest.mark.slow
def test_resume_without_restoring_rng_and_data_differs(tmp_path):
    """What a checkpoint without RNG and data position gives (Errata 12): a different run."""
    stream = _stream()
    full = train(_model(dropout=0.1), RandomWindowBatches(stream, 16, 4, seed=3), _config(tmp_path / "a"))
    ckpt = load_checkpoint(tmp_path / "a" / "ckpt_00000008.pt")
    model = _model(dropout=0.1)
    model.load_state_dict(ckpt["model"])
    # weights only, data from the start, RNG as it happens to be: continue for the remaining steps
    cfg = _config(tmp_path / "c", steps=4, warmup_steps=0)
    naive = train(model, RandomWindowBatches(stream, 16, 4, seed=3), cfg)
    assert naive.values("loss") != full.values("loss")[8:]


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_model(), RandomWindowBatches(_stream(), 16, 4), _config(tmp_path), resume=True)
    train(_model(), RandomWindowBatches(_stream(), 16, 4), _config(tmp_path, steps=4))
    with pytest.raises(ValueError, match="lr"):
        train(_model(), RandomWindowBatches(_stream(), 16, 4), _config(tmp_path, steps=4, lr=1.0), resume=True)


def test_trailing_partial_window_is_stepped_and_weighted_by_its_tokens(tmp_path):
    micro = [_padded_batch([16, 4], seed=s) for s in range(5)]  # 5 micro-batches, windows of 2
    model = _model()
    result = train(model, micro, TrainConfig(steps=10, grad_accum=2, progress=False, lr=1e-2))
    assert result.step == 3  # 2 full windows + 1 partial window of one micro-batch
    assert [r["tokens"] for r in result.history] == [40, 40, 20]

    # the partial window counts its own tokens only: the same as padding it with a micro-batch
    # that holds no real token at all
    empty = {"input_ids": micro[0]["input_ids"], "labels": torch.full_like(micro[0]["labels"], IGNORE_INDEX)}
    reference = _model()
    train(reference, [*micro, empty], TrainConfig(steps=10, grad_accum=2, progress=False, lr=1e-2))
    for (name, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


def test_metrics_clipping_and_eval(tmp_path):
    stream = _stream()
    eval_data = [RandomWindowBatches(stream, 16, 8, seed=99).batch(0)]
    model = _model()
    before = evaluate(model, eval_data)
    cfg = TrainConfig(steps=6, lr=3e-3, eval_every=3, log_every=2, clip_grad_norm=0.5, progress=False,
                      peak_flops=1e12, per_layer_grad_norm_every=2)
    result = train(model, RandomWindowBatches(stream, 16, 4, seed=1), cfg, eval_data=eval_data)
    assert [r["step"] for r in result.history] == [2, 3, 4, 6]  # log_every=2 plus the eval step 3
    assert [r["step"] for r in result.history if "val_loss" in r] == [3, 6]
    for r in result.history:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= r.keys()
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    assert "grad_norm/blocks.0" in result.history[0]
    assert result.val_loss == result.history[-1]["val_loss"] < before
    assert model.training  # evaluate() restored train mode


def test_clipping_happens_on_the_true_gradient():
    """With clip_grad_norm, the update uses gradients of norm <= the threshold."""
    micro = [_padded_batch([16, 16, 16], seed=11)]
    model = _model()
    probe = copy.deepcopy(model)
    accumulate_gradients(probe, micro)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in probe.parameters() if p.grad is not None]))
    cfg = TrainConfig(steps=1, lr=1e-3, clip_grad_norm=float(total) / 10, weight_decay=0.0, progress=False)
    result = train(model, micro, cfg)
    assert result.history[0]["grad_norm"] == pytest.approx(float(total), rel=1e-5)  # logged before clipping


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps"),
        (dict(grad_accum=0), "grad_accum"),
        (dict(lr=-1.0), "lr"),
        (dict(steps=5, warmup_steps=6), "warmup_steps"),
        (dict(precision="fp8"), "precision"),
        (dict(clip_grad_norm=0.0), "clip_grad_norm"),
        (dict(checkpoint_every=5), "out_dir"),
        (dict(betas=(0.9, 1.5)), "betas"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_optimizer_is_fused_on_cpu_and_matches_the_plain_adamw_loop():
    torch.manual_seed(0)
    # float64, so the two update rules must agree far below the size of any single term
    # (lr * weight_decay * |w| is about 2e-5 here)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)).double()
    reference = copy.deepcopy(model)
    config = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt = make_optimizer(model, config, "cpu")
    assert opt.defaults["fused"] is True
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    # reference: torch's single-tensor AdamW loop, same decay split (2-D weights only)
    ref_params = list(reference.parameters())
    ref_opt = torch.optim.AdamW(
        [{"params": [p for p in ref_params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in ref_params if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=config.betas, eps=config.eps, foreach=False)
    assert {id(p) for p in model.parameters() if p.dim() >= 2} == decayed
    ids = torch.randint(0, 32, (4, 8))
    for _ in range(5):
        for m, o in ((model, opt), (reference, ref_opt)):
            m(ids, labels=ids.roll(-1, dims=1)).loss.backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)


def test_eval_data_must_be_reiterable():
    with pytest.raises(ValueError, match="re-iterable"):
        train(_model(), [_padded_batch([4])], TrainConfig(steps=1, progress=False),
              eval_data=iter([_padded_batch([4])]))


# ------------------------------------------------------------------ distributed (2 gloo ranks)


def _ddp_accumulate(rank, world_size, micro):
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    loss = accumulate_gradients(DistributedDataParallel(model), micro[rank::world_size])
    return loss, _grads(model)


@pytest.mark.distributed
def test_ddp_accumulation_equals_the_single_process_full_batch():
    from course_lib.distributed.launch import spawn

    # 4 micro-batches of different real lengths; rank r gets micro[r::2] (so 2 micro-steps, one no_sync)
    micro = [_padded_batch([16, 2], seed=1), _padded_batch([5], seed=2), _padded_batch([1, 1, 1], seed=3),
             _padded_batch([16, 16], seed=4)]
    reference = _model()
    expected_loss = accumulate_gradients(reference, micro)
    for loss, grads in spawn(_ddp_accumulate, 2, micro, timeout_s=180):
        assert loss == pytest.approx(expected_loss, rel=1e-6)  # the logged loss is the global mean
        for name, g in _grads(reference).items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def _ddp_train(rank, world_size, out_dir, steps, resume):
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup_steps=1, checkpoint_every=2, keep_checkpoints=5,
                      out_dir=out_dir, progress=False, seed=7)
    result = train(DistributedDataParallel(model), RandomWindowBatches(_stream(), 16, 2, seed=rank), cfg,
                   resume=resume)
    return result.values("loss"), [p.detach().clone() for p in model.parameters()]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_training_equals_one_process_and_resumes_each_ranks_stream(tmp_path):
    from course_lib.distributed.launch import spawn

    full = spawn(_ddp_train, 2, str(tmp_path / "ddp"), 4, False, timeout_s=240)
    (losses0, params0), (losses1, params1) = full
    assert losses0 == losses1  # every rank logs the same global loss
    assert all(torch.equal(a, b) for a, b in zip(params0, params1, strict=True))

    # one process with grad_accum=2 over both ranks' batches takes the same steps
    single = _model()
    cfg = TrainConfig(steps=4, lr=3e-3, warmup_steps=1, grad_accum=2, progress=False, seed=7)
    reference = train(single, _Interleave([iter(RandomWindowBatches(_stream(), 16, 2, seed=r)) for r in (0, 1)]), cfg)
    assert losses0 == pytest.approx(reference.values("loss"), rel=1e-5)
    for a, b in zip(params0, single.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)

    # only rank 0 wrote checkpoints, holding both ranks' data positions
    state = load_checkpoint(tmp_path / "ddp" / "ckpt_00000002.pt")
    assert [d["seed"] for d in state["data"]] == [0, 1] and len(state["rng"]) == 2

    resumed = spawn(_ddp_train, 2, str(tmp_path / "ddp"), 4, str(tmp_path / "ddp" / "ckpt_00000002.pt"),
                    timeout_s=240)
    assert resumed[0][0] == losses0[2:]  # bitwise
    assert all(torch.equal(a, b) for a, b in zip(resumed[0][1], params0, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_resumes_exactly(tmp_path, precision):
    """bf16 autocast (no scaler) and fp16 with a GradScaler whose state is checkpointed too."""
    stream = _stream(1000)
    cfg = dict(steps=4, checkpoint_every=2, grad_accum=1, warmup_steps=0, precision=precision)
    full = train(_model(), RandomWindowBatches(stream, 16, 2, seed=0), _config(tmp_path / "a", **cfg))
    assert all(math.isfinite(x) for x in full.values("loss"))
    if precision == "fp16":
        assert all(r["loss_scale"] > 1 for r in full.history)  # the scaler is on
        assert load_checkpoint(tmp_path / "a" / "ckpt_00000002.pt")["scaler"]["scale"] > 1
    resumed = train(_model(seed=5), RandomWindowBatches(stream, 16, 2, seed=0), _config(tmp_path / "a", **cfg),
                    resume=tmp_path / "a" / "ckpt_00000002.pt")
    assert resumed.values("loss") == full.values("loss")[2:]
