"""One training loop for every parallelism: FSDP2 and DDP equal one process, resume exactly, per-rank
dropout, and a resume point every rank agrees on (issue 14, bugs 4-6). Two gloo ranks on CPU."""

import shutil

import pytest
import torch
from training_helpers import Interleave as _Interleave
from training_helpers import learnable_stream as _stream
from training_helpers import tiny_model as _model

from course_lib.checkpoint import load_checkpoint
from course_lib.data import RandomWindowBatches
from course_lib.distributed.launch import WorkerFailed, spawn
from course_lib.model import GPT, GPTConfig
from course_lib.training import TrainConfig, train

V = 40


def _cfg(out_dir, steps=4, **kw):
    return TrainConfig(**{**dict(steps=steps, lr=3e-3, warmup_steps=1, checkpoint_every=2, keep_checkpoints=5,
                                 out_dir=out_dir, progress=False, seed=7), **kw})


def _fsdp_train(rank, world_size, out_dir, steps, resume):
    from course_lib.parallel import apply_fsdp

    torch.set_num_threads(1)
    model = apply_fsdp(_model())
    result = train(model, RandomWindowBatches(_stream(), 16, 2, seed=rank), _cfg(out_dir, steps), resume=resume)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    return result.values("loss"), full


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_training_equals_one_process_and_resumes_bitwise(tmp_path):
    """Bug 4: an FSDP2 model was trained as one process (per-rank token counts, FSDP's averaging
    not undone), so its losses differed from one process's on the same global batches."""
    out = str(tmp_path / "fsdp")
    (losses0, state0), (losses1, _) = spawn(_fsdp_train, 2, out, 4, False, timeout_s=240)
    assert losses0 == losses1  # every rank logs the global loss

    single = _model()
    reference = train(single, _Interleave([iter(RandomWindowBatches(_stream(), 16, 2, seed=r)) for r in (0, 1)]),
                      _cfg(None, 4, checkpoint_every=0, grad_accum=2))
    assert losses0 == pytest.approx(reference.values("loss"), rel=1e-5)
    for name, p in single.state_dict().items():
        torch.testing.assert_close(state0[name], p, rtol=1e-4, atol=1e-5, msg=name)

    # sharded checkpoints: a directory written with torch.distributed.checkpoint, loadable in one process
    ckpt = tmp_path / "fsdp" / "ckpt_00000002.dcp"
    assert ckpt.is_dir() and (ckpt / "state.pt").is_file()
    flat = load_checkpoint(ckpt)
    assert flat["step"] == 2 and len(flat["rng"]) == 2 and [d["seed"] for d in flat["data"]] == [0, 1]
    assert flat["model"].keys() == single.state_dict().keys()

    resumed = spawn(_fsdp_train, 2, out, 4, str(ckpt), timeout_s=240)
    assert resumed[0][0] == losses0[2:]  # bitwise
    assert all(torch.equal(resumed[0][1][k], state0[k]) for k in state0)


def _dropout_draw(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    model = DistributedDataParallel(_model(dropout=0.5))
    train(model, RandomWindowBatches(_stream(), 16, 2, seed=0), TrainConfig(steps=1, progress=False, seed=3))
    return torch.rand(4)  # the next numbers of the RNG stream dropout draws from


@pytest.mark.distributed
def test_each_rank_draws_its_own_dropout_masks():
    """Bug 5: every rank used the same seed, so dropout masks were identical on every rank."""
    a, b = spawn(_dropout_draw, 2, timeout_s=120)
    assert not torch.equal(a, b)


def _resume_from_own_dir(rank, world_size, dirs):
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    train(DistributedDataParallel(_model()), RandomWindowBatches(_stream(), 16, 2, seed=rank),
          _cfg(dirs[rank], 6), resume=True)


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_resume_from_rank_0s_choice_or_refuse(tmp_path):
    """Bug 6: each rank picked the newest checkpoint it saw; ranks seeing different ones went on
    from different steps and waited for each other. Rank 0 decides; a rank that cannot read its
    choice makes every rank stop with the reason."""
    from course_lib.distributed.launch import spawn as run

    run(_ddp_steps, 2, str(tmp_path / "run"), timeout_s=180)  # ckpt 2 and 4
    node0, node1 = tmp_path / "node0", tmp_path / "node1"  # two machines' local disks
    shutil.copytree(tmp_path / "run", node0)
    node1.mkdir()
    shutil.copy(tmp_path / "run" / "ckpt_00000002.pt", node1)  # this node missed the step-4 checkpoint
    with pytest.raises(WorkerFailed, match=r"rank 0 resumes from ckpt_00000004\.pt but rank\(s\) \[1\]"):
        run(_resume_from_own_dir, 2, [str(node0), str(node1)], timeout_s=60)


def _ddp_steps(rank, world_size, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    train(DistributedDataParallel(_model()), RandomWindowBatches(_stream(), 16, 2, seed=rank), _cfg(out_dir, 4))


def _ddp_on_own_subgroup(rank, world_size):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    groups = [dist.new_group([r]) for r in range(world_size)]  # every rank creates every group
    model = DistributedDataParallel(_model(), process_group=groups[rank])
    result = train(model, RandomWindowBatches(_stream(), 16, 2, seed=rank), _cfg(None, 3, checkpoint_every=0))
    return result.values("loss")


@pytest.mark.distributed
def test_ddp_on_a_sub_group_normalises_over_that_group_only():
    """Bug 4: DDP on a sub-group used the whole world's size and token counts."""
    losses = spawn(_ddp_on_own_subgroup, 2, timeout_s=120)
    for rank, got in enumerate(losses):
        alone = train(_model(), RandomWindowBatches(_stream(), 16, 2, seed=rank), _cfg(None, 3, checkpoint_every=0))
        assert got == pytest.approx(alone.values("loss"), rel=1e-6)


def _lora_model():
    from course_lib.lora import apply_lora, mark_only_lora_trainable

    model = _model()
    apply_lora(model, rank=4, alpha=8.0)
    mark_only_lora_trainable(model)
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # non-zero B, so the adapters change the loss from step 1
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.02)
    return model


def _compiled_ddp_lora(rank, world_size, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    result = train(DistributedDataParallel(_lora_model()), RandomWindowBatches(_stream(), 16, 2, seed=rank),
                   _cfg(out_dir, 3, checkpoint_every=0), compile=True)
    return result.values("loss"), sorted(load_checkpoint(result.checkpoint)["model"])


@pytest.mark.distributed
@pytest.mark.slow
def test_compile_works_with_ddp_and_lora(tmp_path):
    """Issue 17: compile=True under DDP on a LoRA model gives one eager process's losses and plain keys."""
    from course_lib.training import compiler_problem

    if compiler_problem() is not None:
        pytest.skip(f"no working torch.compile here: {compiler_problem()}")
    (losses, keys), _ = spawn(_compiled_ddp_lora, 2, str(tmp_path / "compiled"), timeout_s=400)
    single = _lora_model()
    eager = train(single, _Interleave([iter(RandomWindowBatches(_stream(), 16, 2, seed=r)) for r in (0, 1)]),
                  _cfg(None, 3, checkpoint_every=0, grad_accum=2))
    assert losses == pytest.approx(eager.values("loss"), rel=1e-4)
    assert keys == sorted(single.state_dict()) and not [k for k in keys if "_orig_mod" in k]


def _tp_and_pipeline_worker(rank, world_size, config, state, ids):
    from course_lib.distributed.tensor_parallel import gather_full_grads
    from course_lib.parallel import apply_tp, build_pipeline

    model = GPT(config).double()
    model.load_state_dict(state)
    apply_tp(model)
    out = model(ids, labels=ids.roll(-1, 1))
    out.loss.backward()
    stage = build_pipeline(GPT(config))
    return {"logits": out.logits.detach(), "loss": out.loss.item(),
            "grads": gather_full_grads(model.blocks[0]), "stage_layers": [int(i) for i in stage.blocks]}


@pytest.mark.distributed
def test_apply_tp_equals_the_unsplit_model_and_build_pipeline_gives_each_rank_its_stage():
    config = GPTConfig(vocab_size=40, block_size=16, n_layer=3, n_head=4, n_embd=32)
    torch.manual_seed(0)
    reference = GPT(config).double()
    ids = torch.randint(0, 40, (2, 16))
    out = reference(ids, labels=ids.roll(-1, 1))
    out.loss.backward()
    results = spawn(_tp_and_pipeline_worker, 2, config, reference.state_dict(), ids, timeout_s=120)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["logits"], out.logits, rtol=1e-12, atol=1e-12)
        assert r["loss"] == pytest.approx(out.loss.item(), rel=1e-12)
        for name, grad in r["grads"].items():
            torch.testing.assert_close(grad, dict(reference.blocks[0].named_parameters())[name].grad)
        assert r["stage_layers"] == [[0, 1], [2]][rank]
