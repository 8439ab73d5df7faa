"""Pipeline parallelism: placement, schedule maths, and split runs equal to the unsplit model."""

from __future__ import annotations

import itertools

import pytest
import torch
from nccl_rules import run_checked

from course_lib.distributed import pipeline as pp
from course_lib.distributed.launch import spawn
from course_lib.lessons import pipeline as workers
from course_lib.lessons.pitfalls import tutorial_device_ids, tutorial_stage_layers
from course_lib.model import GPT, IGNORE_INDEX, GPTConfig

# ------------------------------------------------------------------ placement


@pytest.mark.parametrize("n_layers", range(1, 13))
def test_partition_places_every_layer_once_on_an_existing_stage(n_layers):
    for n_stages in range(1, n_layers + 1):
        parts = pp.partition_layers(n_layers, n_stages)
        assert len(parts) == n_stages
        assert [i for r in parts for i in r] == list(range(n_layers))  # contiguous, each once
        sizes = [len(r) for r in parts]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_partition_refuses_impossible_splits():
    with pytest.raises(ValueError, match="at most 3 stages"):
        pp.partition_layers(3, 4)
    with pytest.raises(ValueError):
        pp.partition_layers(0, 1)


def test_stages_refuse_an_untied_model():
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False))
    with pytest.raises(ValueError, match="tie_embeddings=True"):
        pp.build_stage(model, 0, 2)


def test_the_tutorial_placements_are_wrong_when_the_division_is_not_exact():
    assert max(tutorial_device_ids(5, 2)) == 2  # device 2 of devices {0, 1}
    kept = [i for r in tutorial_stage_layers(5, 2) for i in r]
    assert kept == [0, 1, 2, 3]  # layer 4 silently dropped
    with pytest.raises(ZeroDivisionError):
        tutorial_device_ids(2, 4)


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("kind", pp.KINDS)
@pytest.mark.parametrize("stages, micro", list(itertools.product([1, 2, 3, 4, 6], [1, 2, 3, 4, 8])))
def test_schedules_respect_dependencies_and_match_the_bubble_formula(kind, stages, micro):
    events = pp.schedule(kind, stages, micro)
    end = {(e.op, e.stage, e.microbatch): e.t + 1 for e in events}
    assert len(end) == len(events) == 2 * stages * micro  # every F and B of every stage, once
    assert len({(e.stage, e.t) for e in events}) == len(events)  # a stage does one thing at a time
    for e in events:
        if e.op == "F" and e.stage > 0:
            assert e.t >= end[("F", e.stage - 1, e.microbatch)]
        if e.op == "B":
            assert e.t >= end[("F", e.stage, e.microbatch)]
            if e.stage < stages - 1:
                assert e.t >= end[("B", e.stage + 1, e.microbatch)]
    bubble = pp.schedule_bubble(kind, stages, micro)
    if kind == "naive":
        assert bubble == pytest.approx((stages - 1) / stages)
    else:
        assert bubble == pytest.approx(pp.bubble_fraction(stages, micro))
        assert max(end.values()) == 2 * (micro + stages - 1)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages, micro", [(2, 1), (2, 8), (4, 4), (3, 5)])
def test_replay_with_measured_durations(kind, stages, micro):
    # unit durations: exactly the unit-time schedule
    unit = pp.replay_schedule(kind, stages, micro, lambda s, op, m: 1.0)
    assert [(i.stage, i.start, i.op, i.microbatch) for i in unit] == [
        (e.stage, float(e.t), e.op, e.microbatch) for e in pp.schedule(kind, stages, micro)]
    # balanced stages with a backward twice the forward: still (P-1)/(M+P-1)
    timed = pp.replay_schedule(kind, stages, micro, lambda s, op, m: 2.0 if op == "B" else 1.0)
    assert pp.measured_bubble(timed, stages) == pytest.approx(pp.bubble_fraction(stages, micro))
    # a slower last stage: the other stages idle more, and every dependency still holds
    slow = pp.replay_schedule(kind, stages, micro, lambda s, op, m: 1.5 if s == stages - 1 else 1.0)
    end = {(i.op, i.stage, i.microbatch): i.end for i in slow}
    for i in slow:
        if i.op == "F" and i.stage > 0:
            assert i.start >= end[("F", i.stage - 1, i.microbatch)]
        if i.op == "B" and i.stage < stages - 1:
            assert i.start >= end[("B", i.stage + 1, i.microbatch)]
    if micro > 1:  # with one micro-batch the stages take turns whatever their speed
        assert pp.measured_bubble(slow, stages) > pp.bubble_fraction(stages, micro)


def test_1f1b_holds_fewer_activations_than_gpipe():
    assert pp.peak_in_flight("gpipe", 4, 8) == [8, 8, 8, 8]
    assert pp.peak_in_flight("1f1b", 4, 8) == [4, 3, 2, 1]
    assert pp.peak_in_flight("1f1b", 4, 2) == [2, 2, 2, 1]
    assert pp.peak_in_flight("naive", 4, 8) == [1, 1, 1, 1]


def test_bubble_formula_and_measurement():
    assert pp.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert pp.bubble_fraction(1, 5) == 0.0
    intervals = [pp.Interval(0, 0.0, 1.0, "F", 0), pp.Interval(1, 1.0, 2.0, "F", 0)]
    assert pp.measured_bubble(intervals) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        pp.schedule("zero-bubble", 2, 2)


# ------------------------------------------------------------------ stages and real runs

ROWS, SEQ, MICRO = 8, 16, 4


def _setup(n_layer: int) -> tuple[GPTConfig, dict, dict]:
    config = GPTConfig.from_preset("nano", vocab_size=50, n_layer=n_layer)
    torch.manual_seed(0)
    state = GPT(config).state_dict()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (ROWS, SEQ), generator=g)
    labels = torch.randint(0, 50, (ROWS, SEQ), generator=g)
    for row in range(ROWS):
        labels[row, SEQ - 1 - row:] = IGNORE_INDEX  # uneven real-token counts per micro-batch
    return config, state, {"input_ids": ids, "labels": labels}


def _reference(config, state, batch):
    model = GPT(config)
    model.load_state_dict(state)
    loss = model(batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_stages_chained_in_one_process_equal_the_model():
    config, state, batch = _setup(5)
    model = GPT(config)
    model.load_state_dict(state)
    x = batch["input_ids"]
    for s in range(3):
        x = pp.build_stage(model, s, 3)(x)
    torch.testing.assert_close(x, model(batch["input_ids"]).logits)


def _all_pipelines(rank: int, world_size: int, config, state, batch) -> dict:
    out = {kind: workers.pipeline_worker(rank, world_size, config, state, batch, MICRO, kind) for kind in pp.KINDS}
    for kind in ("gpipe", "1f1b"):
        out[f"torch-{kind}"] = workers.torch_pipeline_worker(rank, world_size, config, state, batch, MICRO, kind)
    out["sweep"] = workers.bubble_sweep_worker(rank, world_size, config, state, batch, [("naive", 1), ("gpipe", 2)], 2)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("stages, n_layer", [(1, 2), (2, 3), (4, 5)])  # uneven: 2+1 and 2+1+1+1 layers
def test_pipelines_give_the_unsplit_models_loss_and_gradients(stages, n_layer):
    config, state, batch = _setup(n_layer)
    out = spawn(run_checked, stages, _all_pipelines, config, state, batch, timeout_s=150)  # NCCL's rules too
    ref_loss, ref_grads = _reference(config, state, batch)
    assert [r["1f1b"]["layers"] for r in out] == [list(x) for x in pp.partition_layers(n_layer, stages)]
    for kind in (*pp.KINDS, "torch-gpipe", "torch-1f1b"):
        assert out[-1][kind]["loss"] == pytest.approx(ref_loss, abs=1e-6), kind
        seen = set()
        for rank, result in enumerate(out):
            for name, grad in result[kind]["grads"].items():
                torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=0,
                                           msg=f"{kind} stage {rank} {name}")
                seen.add(name)
        assert seen == set(ref_grads), f"{kind}: parameters without a stage: {set(ref_grads) - seen}"
    for kind in pp.KINDS:  # the activations each stage really held match the schedule's count
        assert [r[kind]["peak"] for r in out] == pp.peak_in_flight(kind, stages, MICRO)
        intervals = [i for r in out for i in r[kind]["intervals"]]
        assert len(intervals) == 2 * stages * MICRO
        assert 0.0 <= pp.measured_bubble(intervals, stages) < 1.0
    sweep = {run: [i for r in out for i in r["sweep"][run]] for run in [("naive", 1), ("gpipe", 2)]}
    assert len(sweep[("gpipe", 2)]) == 2 * stages * 2
    # naive: the dependencies let only one stage compute at a time, so at least (P-1)/P is idle
    assert pp.measured_bubble(sweep[("naive", 1)], stages) >= (stages - 1) / stages - 0.02


def test_schedule_explorer_widget_shows_the_tested_numbers():
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    from course_lib.widgets import pipeline_schedule_widget, pipeline_summary_html

    box = pipeline_schedule_widget(stages=4, microbatches=8, kind="1f1b")
    controls, result = box.children[0].children, box.children[1]
    assert "class='pipeline-bubble'>0.273<" in result.value  # 3 / 11, independent of the code
    assert "[4, 3, 2, 1]" in result.value
    controls[0].value = "gpipe"
    controls[2].value = 1
    assert "class='pipeline-bubble'>0.750<" in result.value  # one micro-batch: 3 of 4 stages idle
    assert result.value == pipeline_summary_html("gpipe", 4, 1)
