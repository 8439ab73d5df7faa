"""Loggers, gradient norms, throughput and MFU (course_lib.monitoring)."""

import json
import math
import time

import pytest
import torch
import torch.nn as nn

from course_lib.model import GPT, GPTConfig
from course_lib.monitoring import (
    JSONLLogger,
    LivePlot,
    Logger,
    MultiLogger,
    Throughput,
    WandbLogger,
    grad_norms,
    mfu,
    read_jsonl,
)


def _model_with_grads(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16))
    x = torch.randint(0, 50, (4, 16))
    model(x, labels=torch.roll(x, -1, dims=1)).loss.backward()
    return model


def test_jsonl_round_trip_and_append_on_resume(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with JSONLLogger(path) as log:
        log.log({"loss": torch.tensor(2.5), "lr": 1e-3}, step=1)
        log.log({"loss": 2.25, "lr": 9e-4, "note": "ok"}, step=2)
        # every line is on disk as soon as it is logged (a crash loses nothing already logged)
        assert len(path.read_text().splitlines()) == 2
    with JSONLLogger(path) as log:  # a resumed run appends
        log.log({"loss": 2.0}, step=3)
    records = read_jsonl(path)
    assert records == [
        {"step": 1, "loss": 2.5, "lr": 1e-3},
        {"step": 2, "loss": 2.25, "lr": 9e-4, "note": "ok"},
        {"step": 3, "loss": 2.0},
    ]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def _strict_json(line: str) -> dict:
    """Parse as strict JSON (RFC 8259): NaN and Infinity are not JSON, as jq and JavaScript say."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_jsonl_writes_non_finite_values_as_null_with_a_flag(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with JSONLLogger(path) as log:
        log.log({"loss": float("nan"), "grad_norm": torch.tensor(float("inf")), "lr": 1e-3}, step=7)
        log.log({"loss": -math.inf}, step=8)
        log.log({"loss": 2.0}, step=9)
    lines = [_strict_json(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"step": 7, "loss": None, "grad_norm": None, "lr": 1e-3,
                        "nonfinite": {"loss": "nan", "grad_norm": "inf"}}
    assert lines[1] == {"step": 8, "loss": None, "nonfinite": {"loss": "-inf"}}
    assert lines[2] == {"step": 9, "loss": 2.0}  # no flag when every value is finite
    back = read_jsonl(path)  # the reader restores what was logged
    assert math.isnan(back[0]["loss"]) and back[0]["grad_norm"] == math.inf and back[1]["loss"] == -math.inf
    assert "nonfinite" not in back[0] and back[2] == {"step": 9, "loss": 2.0}
    with JSONLLogger(path) as log:
        with pytest.raises(ValueError, match="reserved"):
            log.log({"nonfinite": 1}, step=10)
        with pytest.raises(ValueError, match="scalars"):
            log.log({"losses": [1.0, float("nan")]}, step=10)
    assert len(path.read_text().splitlines()) == 3  # nothing half-written


def test_jsonl_refuses_non_scalar_tensor_and_closed_logger(tmp_path):
    log = JSONLLogger(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="scalar"):
        log.log({"loss": torch.ones(3)}, step=0)
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.log({"loss": 1.0}, step=1)


def test_wandb_offline_writes_a_run_without_network(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = WandbLogger(project="llm-course-test", mode="offline", config={"lr": 1e-3}, dir=tmp_path)
    for step in range(3):
        log.log({"loss": 3.0 - step, "grad_norm": torch.tensor(0.5)}, step=step)
    log.close()
    run_dir = log.run_dir
    assert run_dir is not None and run_dir.is_dir()
    assert run_dir.parent == tmp_path / "wandb"
    assert run_dir.name.startswith("offline-run-")
    (data,) = run_dir.glob("run-*.wandb")  # what `wandb sync` would upload later
    # wandb's service process writes the file; finish() may return just before the last flush
    deadline = time.monotonic() + 30
    while (raw := data.read_bytes()).count(b"grad_norm") < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b"llm-course-test" in raw
    assert raw.count(b"grad_norm") >= 3  # one history record per logged step


def test_wandb_disabled_and_bad_modes(tmp_path, monkeypatch):
    log = WandbLogger(mode="disabled", dir=tmp_path)
    log.log({"loss": 1.0}, step=0)
    log.close()
    assert log.run_dir is None
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(ValueError, match="offline"):
        WandbLogger(mode="dryrun")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(RuntimeError, match="wandb login"):
        WandbLogger(mode="online", dir=tmp_path)


def test_multilogger_and_liveplot(tmp_path):
    plot = LivePlot(metrics=("loss", "lr"), min_interval_s=0.0)
    jsonl = JSONLLogger(tmp_path / "m.jsonl")
    multi = MultiLogger([jsonl, plot])
    assert isinstance(plot, Logger) and isinstance(jsonl, Logger)
    for step in range(5):
        multi.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    multi.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == list(range(5))
    xs, ys = plot._lines["loss"].get_data()
    assert list(xs) == list(range(5)) and list(ys) == [1.0 / (s + 1) for s in range(5)]
    assert plot.png().startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(TypeError, match="not a logger"):
        MultiLogger([object()])


def test_global_grad_norm_equals_clip_grad_norm():
    model = _model_with_grads()
    ours = grad_norms(model)["grad_norm"]
    reference = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf"))
    assert ours == pytest.approx(reference.item(), rel=1e-5)
    # independent float64 check
    total = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in model.parameters() if p.grad is not None))
    assert ours == pytest.approx(total, rel=1e-5)


def test_per_layer_norms_are_per_block_and_combine_to_global():
    model = _model_with_grads()
    norms = grad_norms(model, per_layer=True)
    groups = {k for k in norms if k != "grad_norm"}
    assert groups == {"grad_norm/wte", "grad_norm/wpe", "grad_norm/ln_f"} | {
        f"grad_norm/blocks.{i}" for i in range(3)
    }
    combined = math.sqrt(sum(norms[k] ** 2 for k in groups))
    assert combined == pytest.approx(norms["grad_norm"], rel=1e-5)
    block0 = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in model.blocks[0].parameters()))
    assert norms["grad_norm/blocks.0"] == pytest.approx(block0, rel=1e-5)


def test_grad_norms_needs_backward_first():
    with pytest.raises(ValueError, match="backward"):
        grad_norms(nn.Linear(2, 2))


def test_grad_norms_syncs_with_the_host_once(monkeypatch):
    model = _model_with_grads()
    calls = {"item": 0, "tolist": 0}
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist

    def item(self):
        calls["item"] += 1
        return real_item(self)

    def tolist(self):
        calls["tolist"] += 1
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    grad_norms(model, per_layer=True)
    assert calls == {"item": 0, "tolist": 1}


def test_mfu_arithmetic():
    # 1000 tokens/s at 6e9 FLOPs/token = 6e12 FLOP/s; over a 12e12 peak that is half
    assert mfu(1000, 6e9, 12e12) == pytest.approx(0.5)
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16))
    assert mfu(100.0, model.flops_per_token(), 1e9) == pytest.approx(100.0 * model.flops_per_token() / 1e9)
    with pytest.raises(ValueError, match="positive"):
        mfu(1.0, 1.0, 0.0)


def test_throughput_meter_counts_tokens_over_time():
    meter = Throughput(window=3)
    for _ in range(4):
        time.sleep(0.02)
        rate = meter.update(100)
    assert meter.total_tokens == 400
    # the window holds the last three steps of >= 20 ms each: at most 100 tokens / 0.02 s
    assert 0 < rate <= 100 / 0.02
    assert rate > 100 / 0.5  # and not absurdly slow either


def test_matmul_peak_and_datasheet_peak():
    from course_lib.monitoring import DATASHEET_PEAK_FLOPS, datasheet_peak_flops, measure_matmul_flops

    t0 = time.perf_counter()
    peak = measure_matmul_flops("cpu", n=128, reps=3)
    elapsed = time.perf_counter() - t0
    # 4 products of 2 * 128^3 FLOPs each ran in `elapsed`: the best one was at least that fast
    assert peak >= 2 * 128**3 / elapsed
    assert datasheet_peak_flops("cpu") is None  # no datasheet for a CPU: MFU uses the measured peak
    assert DATASHEET_PEAK_FLOPS["H100"]["bf16"] == DATASHEET_PEAK_FLOPS["H200"]["bf16"] == 989e12


def test_layer_norms_on_jump_catches_the_spike_between_samples():
    import torch.nn as nn

    from course_lib.monitoring import LayerNormsOnJump, grad_norms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    jumps = LayerNormsOnJump(model, factor=2.0, window=5)
    x = torch.randn(8, 4)
    expected = {}
    for step in range(1, 13):
        model.zero_grad()
        scale = 50.0 if step == 7 else 1.0  # one spike, between two "every 10 steps" samples
        (model(x * scale) ** 2).mean().backward()
        norms = grad_norms(model, per_layer=True)
        if step == 7:
            expected = norms
        jumps.log({"grad_norm": norms["grad_norm"], "loss": 0.0}, step)
    assert sorted(jumps.records) == [7]
    assert jumps.records[7] == pytest.approx({k: v for k, v in expected.items() if k != "grad_norm"}, rel=1e-5)
    jumps.close()
    with pytest.raises(ValueError):
        LayerNormsOnJump(model, factor=1.0)
