"""The training loop's state and step: resumable data sources, the last step, fp16 scaling, host syncs,
pluggable optimizers and torch.compile (issue 14, bugs 1-3; issue 13 item 7; issue 17)."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader
from training_helpers import CrashAt as _CrashAt
from training_helpers import learnable_stream as _stream
from training_helpers import tiny_model as _model

from course_lib.checkpoint import latest_checkpoint, load_checkpoint
from course_lib.data import RandomWindowBatches
from course_lib.model import IGNORE_INDEX
from course_lib.precision import make_grad_scaler
from course_lib.training import TrainConfig, accumulate_gradients, train

V = 40


def _batches(n, rows=2, seed=3):
    source = RandomWindowBatches(_stream(), 16, rows, seed=seed)
    return [source.batch(i) for i in range(n)]


def _cfg(out, **kw):
    base = dict(steps=6, lr=3e-3, warmup_steps=1, grad_accum=2, checkpoint_every=2, out_dir=str(out),
                progress=False, seed=7, keep_checkpoints=5)
    return TrainConfig(**{**base, **kw})


def _interrupted_then_resumed(tmp_path, make_source):
    full = train(_model(dropout=0.1), make_source(), _cfg(tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        train(_model(dropout=0.1), make_source(), _cfg(tmp_path / "b"), loggers=[_CrashAt(3)])
    assert latest_checkpoint(tmp_path / "b").name == "ckpt_00000002.pt"
    resumed = train(_model(seed=9, dropout=0.1), make_source(), _cfg(tmp_path / "b"), resume=True)
    return full, resumed


def test_a_list_of_batches_resumes_where_it_stopped(tmp_path):
    """Bug 1: a resumed list restarted from batch 0, so its losses differed from the uninterrupted run's."""
    batches = _batches(12)
    full, resumed = _interrupted_then_resumed(tmp_path, lambda: batches)
    assert resumed.resumed_from == 2
    assert resumed.values("loss") == full.values("loss")[2:]  # bitwise


def test_a_sequential_dataloader_resumes_where_it_stopped(tmp_path):
    rows = [{k: v[0] for k, v in b.items()} for b in _batches(24, rows=1)]
    full, resumed = _interrupted_then_resumed(tmp_path, lambda: DataLoader(rows, batch_size=2, shuffle=False))
    assert resumed.values("loss") == full.values("loss")[2:]
    assert load_checkpoint(tmp_path / "b" / "ckpt_00000002.pt")["data"] == [{"position": 4, "epoch": None}]


def test_a_dataloader_with_a_dynamic_batch_sampler_resumes_in_its_epoch(tmp_path):
    """Variable-length documents, a token budget per batch, shuffled from (seed, epoch): replayed exactly."""
    from functools import partial

    from course_lib.data import DynamicBatchSampler, collate_padded

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 17, (60,), generator=g).tolist()
    stream = _stream()
    items = [{"input_ids": stream[i:i + n], "labels": stream[i + 1:i + n + 1]} for i, n in enumerate(lengths)]

    made = []

    def loader():
        sampler = DynamicBatchSampler(lengths, max_tokens=32, shuffle=True, seed=1)
        if len(made) < 2:  # the two runs train in epoch 3; the resumed one starts at 0 and is told 3
            sampler.set_epoch(3)
        made.append(sampler)
        return DataLoader(items, batch_sampler=sampler, collate_fn=partial(collate_padded, pad_id=0))

    full, resumed = _interrupted_then_resumed(tmp_path, loader)
    assert resumed.values("loss") == full.values("loss")[2:]
    assert load_checkpoint(tmp_path / "b" / "ckpt_00000002.pt")["data"] == [{"position": 4, "epoch": 3}]
    assert made[-1].epoch == 3


@pytest.mark.parametrize("make", [
    lambda b: DataLoader([{k: v[0] for k, v in x.items()} for x in b], batch_size=1, shuffle=True),
    lambda b: (x for x in b),
], ids=["shuffling-dataloader", "generator"])
def test_sources_that_cannot_resume_are_refused_when_checkpointing(tmp_path, make):
    with pytest.raises(ValueError, match="cannot checkpoint.*RandomWindowBatches"):
        train(_model(), make(_batches(4)), _cfg(tmp_path))
    train(_model(), make(_batches(4)), TrainConfig(steps=2, progress=False))  # no checkpoints: fine


def test_data_ending_at_a_window_boundary_still_evaluates_and_checkpoints(tmp_path):
    """Bug 2: with 4 batches and grad_accum=2 the run ended with no final eval and no checkpoint."""
    eval_data = _batches(1, seed=99)
    cfg = TrainConfig(steps=10, grad_accum=2, checkpoint_every=0, out_dir=str(tmp_path), progress=False, log_every=5)
    result = train(_model(), _batches(4), cfg, eval_data=eval_data)
    assert result.step == 2
    assert result.checkpoint == tmp_path / "ckpt_00000002.pt" and result.checkpoint.is_file()
    assert [r["step"] for r in result.history] == [2] and "val_loss" in result.history[-1]


def test_fp16_accumulation_refuses_to_run_without_loss_scaling():
    """Bug 3: accumulate_gradients(precision="fp16") ran without a GradScaler (gradients underflow)."""
    window = _batches(2)
    with pytest.raises(ValueError, match="loss scaling"):
        accumulate_gradients(_model(), window, precision="fp16")
    reference = _model()
    accumulate_gradients(reference, window, precision="fp32")
    model = _model()
    scaler = make_grad_scaler("cpu", "fp16", init_scale=2.0**10)
    accumulate_gradients(model, window, precision="fp16", scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.unscale_(opt)  # the gradients were scaled by 2**10; unscaled they match fp32's
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0.05, atol=2e-3, msg=name)


def test_the_loop_reads_device_values_only_on_logged_steps(monkeypatch):
    """Issue 13 item 7: no host sync per step beyond what log_every asks for.

    Every way of reading a tensor back to the host is counted (item, float, int, bool, tolist,
    and the loop's device synchronisation): a run of 8 steps must read as often as one of 4
    when both log only their last step.
    """
    import course_lib.training as training

    calls = {"n": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            calls["n"] += 1
            return original(self, *a, **k)
        return wrapper

    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    real_sync = training.synchronize
    monkeypatch.setattr(training, "synchronize", lambda d: (calls.__setitem__("n", calls["n"] + 1), real_sync(d)))

    def reads(steps):
        calls["n"] = 0
        train(_model(), RandomWindowBatches(_stream(), 16, 2, seed=0),
              TrainConfig(steps=steps, grad_accum=2, log_every=100, progress=False, warmup_steps=0))
        return calls["n"]

    four, eight = reads(4), reads(8)
    assert four == eight, f"{eight - four} extra host reads for 4 more steps"
    assert 0 < four <= 4  # the logged step reads loss and grad norm (and syncs for its timer)


def test_optimizer_can_be_an_instance_or_a_factory():
    window = _batches(1)
    probe = _model()
    accumulate_gradients(probe, window)
    before = [p.detach().clone() for p in probe.parameters()]
    cfg = TrainConfig(steps=1, clip_grad_norm=None, warmup_steps=0, progress=False)
    for make in (lambda m: torch.optim.SGD(m.parameters(), lr=0.5), None):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.5) if make is None else make
        train(model, window, cfg, optimizer=opt)
        for p, b, g in zip(model.parameters(), before, probe.parameters(), strict=True):
            torch.testing.assert_close(p.detach(), b - 0.5 * g.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="Optimizer"):
        train(_model(), window, cfg, optimizer=lambda m: "adam")


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes(tmp_path):
    """Issue 17: compile=True gives eager's losses (within float tolerance) and plain checkpoints."""
    from course_lib.training import compiler_problem

    if compiler_problem() is not None:
        pytest.skip(f"no working torch.compile here: {compiler_problem()}")
    cfg = dict(steps=4, grad_accum=1, checkpoint_every=2)
    eager = train(_model(), RandomWindowBatches(_stream(), 16, 2, seed=0), _cfg(tmp_path / "e", **cfg))
    compiled = train(_model(), RandomWindowBatches(_stream(), 16, 2, seed=0), _cfg(tmp_path / "c", **cfg),
                     compile=True)
    assert compiled.values("loss") == pytest.approx(eager.values("loss"), rel=1e-4)
    state = load_checkpoint(tmp_path / "c" / "ckpt_00000002.pt")["model"]
    assert not [k for k in state if "_orig_mod" in k] and state.keys() == _model().state_dict().keys()
    resumed = train(_model(seed=4), RandomWindowBatches(_stream(), 16, 2, seed=0), _cfg(tmp_path / "c", **cfg),
                    resume=tmp_path / "c" / "ckpt_00000002.pt", compile=True)
    assert resumed.values("loss") == pytest.approx(compiled.values("loss")[2:], rel=1e-5)


def test_a_missing_compiler_is_a_clear_error(monkeypatch):
    import course_lib.training as training

    monkeypatch.setattr(training, "_COMPILER_ERROR", ["no C++ compiler found"])
    with pytest.raises(RuntimeError, match="torch.compile does not work.*no C\\+\\+ compiler.*--compile"):
        train(_model(), _batches(1), TrainConfig(steps=1, progress=False), compile=True)


def test_real_tokens_counts_scored_labels_on_the_host():
    from course_lib.parallel import real_tokens

    labels = torch.tensor([[1, 2, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 5]])
    assert real_tokens(labels) == 3
    assert copy.copy(real_tokens(labels[:, :1])) == 1
