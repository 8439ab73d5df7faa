"""``python -m course_lib``: a real short run, one-line errors, and resume after a real SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from course_lib import cli
from course_lib.monitoring import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"step", "loss", "lr", "grad_norm", "tokens_per_s"}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env.pop("COURSE_LIB_DEBUG", None)
    return env


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "course_lib", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_a_30_step_run_learns_and_writes_documented_metrics(tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    proc = _run("train", "--corpus", "shakespeare", "--preset", "tiny", "--steps", "30", "--micro-batch", "4",
                "--out", str(out), "--eval-every", "15", "--eval-batches", "2", "--no-progress")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 60
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))  # --log-every defaults to 1
    for r in records:
        assert FIELDS <= r.keys()
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    lrs = [r["lr"] for r in records]
    assert lrs[0] == 0.0 and lrs[1] > 0 and max(lrs) == pytest.approx(1e-3)  # warmup, then the peak
    assert [r["step"] for r in records if "val_loss" in r] == [15, 30]
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.5  # a char model falls from about ln(V) fast
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_layer"] == 4 and config["args"]["steps"] == 30
    assert (out / "tokenizer.json").is_file() and (out / "ckpt_00000030.pt").is_file()
    assert "done: step 30/30" in proc.stdout


def _main(argv, capsys):
    """Run the CLI in-process; return (exit status, stderr)."""
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse errors
        status = e.code
    return status, capsys.readouterr().err


def _assert_one_line_error(status, err, match):
    assert status != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and match in lines[0], err


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "ten"], "--steps"),
        (["--grad-accum", "0"], "--grad-accum"),
        (["--micro-batch", "-2"], "--micro-batch"),
        (["--preset", "huge"], "huge"),
        (["--corpus", "wikipedia"], "wikipedia"),
        (["--precision", "fp8"], "fp8"),
        (["--lr", "-1"], "--lr"),
        (["--lora-rank", "4"], "--init-from"),
        (["--lora-alpha", "8"], "--lora-rank"),
        (["--resume"], "no checkpoint"),
        (["--warmup-steps", "50", "--steps", "10"], "--warmup-steps"),
        (["--init-from", "no_such_model"], "no_such_model"),
        (["--device", "tpu9"], "tpu9"),
        (["--wandb", "sometimes"], "sometimes"),
        (["--bogus-flag"], "--bogus-flag"),
        (["--fsdp"], "torchrun"),
    ],
)
def test_bad_flags_exit_non_zero_with_one_line(tmp_path, capsys, flags, match):
    status, err = _main(["train", "--out", str(tmp_path / "run"), "--preset", "nano", "--steps", "5", *flags], capsys)
    _assert_one_line_error(status, err, match)


def test_more_impossible_setups(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _assert_one_line_error(*_main(["train", "--out", str(a_file)], capsys), "is a file")
    _assert_one_line_error(*_main(["train"], capsys), "--out")
    _assert_one_line_error(*_main([], capsys), "required")
    if not torch.cuda.is_available():
        _assert_one_line_error(*_main(["train", "--out", str(tmp_path / "r"), "--device", "cuda"], capsys), "CUDA")
    # a device that lacks fp16
    import course_lib.device
    monkeypatch.setattr(course_lib.device, "supported_precisions", lambda device=None: ["fp32"])
    _assert_one_line_error(*_main(["train", "--out", str(tmp_path / "r"), "--precision", "fp16"], capsys),
                           "not supported")
    import course_lib.training
    monkeypatch.setattr(course_lib.training, "_COMPILER_ERROR", ["no C++ compiler"])
    _assert_one_line_error(*_main(["train", "--out", str(tmp_path / "r"), "--compile"], capsys), "no C++ compiler")


@pytest.mark.slow
def test_existing_runs_need_resume_with_the_same_settings(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--preset", "nano", "--steps", "4", "--micro-batch", "2", "--eval-batches", "1",
            "--out", out, "--no-progress"]
    assert _main(base, capsys)[0] == 0
    _assert_one_line_error(*_main(base, capsys), "--resume")  # would overwrite the run
    _assert_one_line_error(*_main([*base, "--resume", "--lr", "0.5"], capsys), "--lr")
    _assert_one_line_error(*_main([*base, "--resume", "--seed", "3"], capsys), "--seed")
    _assert_one_line_error(*_main([*base, "--resume", "--weight-decay", "0.5"], capsys), "--weight-decay")


@pytest.mark.slow
def test_subprocess_error_is_one_line_without_traceback(tmp_path):
    proc = _run("train", "--out", str(tmp_path / "run"), "--steps", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_doctor_reports_and_exits_by_its_checks(capsys, monkeypatch):
    status = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert "[OK] torch" in out
    import course_lib.device
    assert status == (0 if all(c.ok for c in course_lib.device.run_checks()) else 1)
    monkeypatch.setattr(course_lib.device, "run_checks",
                        lambda: [course_lib.device.Check("torch", True, "x"), course_lib.device.Check("gpu", False, "none")])
    assert cli.main(["doctor"]) == 1
    assert "[FAIL] gpu" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_a_real_sigkill_continues_the_same_run(tmp_path):
    args = ["train", "--preset", "nano", "--steps", "24", "--micro-batch", "4", "--grad-accum", "2",
            "--checkpoint-every", "4", "--eval-every", "8", "--eval-batches", "2", "--no-progress"]
    full = _run(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "course_lib", *args, "--out", str(out)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # wait until it is past a checkpoint, mid-way to the next
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    logged = [r["step"] for r in read_jsonl(metrics)]
    assert 10 <= logged[-1] < 24

    resumed = _run(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(metrics)
    assert [r["step"] for r in b] == list(range(1, 25))  # the lines past the checkpoint were replaced
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key


@pytest.mark.distributed
@pytest.mark.slow
def test_the_same_command_under_torchrun_trains_with_ddp(tmp_path):
    out = tmp_path / "ddp"
    env = dict(_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "course_lib",
         "train", "--preset", "nano", "--steps", "4", "--micro-batch", "2", "--eval-batches", "1",
         "--checkpoint-every", "2", "--out", str(out), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # rank 0 alone logs
    assert records[0]["tokens"] == 2 * 2 * 32  # both ranks' real tokens: the global batch
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert len(torch.load(out / "ckpt_00000004.pt", weights_only=True)["data"]) == 2


@pytest.mark.slow
def test_bench_prints_throughput_and_mfu_per_precision(capsys):
    assert cli.main(["bench", "--preset", "nano", "--steps", "2", "--micro-batch", "2", "--precision", "fp32"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("fp32")]
    assert len(rows) == 1
    precision, rate, peak, utilisation = rows[0]
    assert float(rate.replace(",", "")) > 0 and float(peak.replace(",", "")) > 0
    assert 0 < float(utilisation.rstrip("%")) < 100


@pytest.mark.slow
def test_checkpointing_init_from_and_lora_flags(tmp_path, capsys):
    base = ["train", "--preset", "nano", "--steps", "3", "--micro-batch", "2", "--eval-batches", "1", "--no-progress"]
    assert cli.main([*base, "--out", str(tmp_path / "pre"), "--checkpointing"]) == 0
    pretrained = torch.load(tmp_path / "pre" / "ckpt_00000003.pt", weights_only=True)

    # fine-tune on the other corpus from that run directory, with LoRA adapters only
    assert cli.main([*base, "--corpus", "python_docs", "--out", str(tmp_path / "ft"), "--init-from",
                     str(tmp_path / "pre"), "--lora-rank", "4"]) == 0
    tuned = torch.load(tmp_path / "ft" / "ckpt_00000003.pt", weights_only=True)
    lora_keys = [k for k in tuned["model"] if "lora_" in k]
    assert lora_keys and tuned["extra"]["lora"] == {"rank": 4, "alpha": 8.0}
    for name, value in pretrained["model"].items():  # the base weights stayed frozen
        frozen_name = name if name in tuned["model"] else name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(tuned["model"][frozen_name], value), name
    assert any(not torch.equal(tuned["model"][k], torch.zeros_like(tuned["model"][k])) for k in lora_keys if "lora_B" in k)

    # a checkpoint holding adapters is refused as a starting point, with the reason
    _assert_one_line_error(*_main([*base, "--out", str(tmp_path / "x"), "--init-from", str(tmp_path / "ft")], capsys),
                           "LoRA")
