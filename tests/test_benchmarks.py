"""The throughput benchmark's statistics and its end-to-end run (benchmarks/throughput.py)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from throughput import median_interval  # noqa: E402


def test_median_interval_uses_the_binomial_ranks():
    # n=15: P(Bin(15, 1/2) <= 3) = 0.018 <= 0.025 < P(<= 4) = 0.059, so the interval is the
    # 4th smallest to the 4th largest value.
    values = [float(v) for v in range(1, 16)]
    random.Random(0).shuffle(values)
    assert median_interval(values) == (4.0, 12.0)


def test_median_interval_falls_back_to_the_range_when_too_few_values():
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    with pytest.raises(ValueError, match="at least one value"):
        median_interval([])


def test_median_interval_covers_the_true_median_of_a_skewed_distribution():
    # Timings are right-skewed; a lognormal's median is exp(mu). Coverage must be >= 95%.
    rng = random.Random(1)
    trials, n, covered = 2000, 15, 0
    for _ in range(trials):
        low, high = median_interval([rng.lognormvariate(0.0, 0.5) for _ in range(n)])
        covered += low <= 1.0 <= high
    assert covered / trials >= 0.95


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` on one thread with ``args``."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--threads", "1", *args],
        capture_output=True, text=True, timeout=240,
    )


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The cells of the printed table's tiny and small rows, by size."""
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith(("| tiny", "| small"))]
    return {row[0].strip(): [cell.strip() for cell in row] for row in rows}


@pytest.mark.slow
def test_throughput_script_compares_equal_sized_models_and_writes_json(tmp_path):
    out = tmp_path / "t.json"
    proc = run_benchmark("throughput.py", "--sizes", "nano", "--reps", "5", "--warmup", "1",
                         "--json", str(out), "--min-ratio", "0.01")
    assert proc.returncode == 0, proc.stderr
    assert "| nano |" in proc.stdout and "ratio (95% CI)" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tokens_per_step"] == 16 * 32
    assert row["ratio_low"] <= row["ratio"] <= row["ratio_high"]
    assert 0 < row["mfu_measured"] < 1.5  # measured peak is a real matmul: MFU is a fraction


@pytest.mark.slow
def test_throughput_script_fails_when_course_lib_is_beyond_noise_slower():
    proc = run_benchmark("throughput.py", "--sizes", "nano", "--reps", "5", "--warmup", "1", "--min-ratio", "1000")
    assert proc.returncode == 1
    assert "slower than 1000.0x the reference at nano" in proc.stderr


@pytest.mark.slow
def test_qkv_fusion_benchmark_prints_equal_gradients_and_the_saving():
    proc = run_benchmark("qkv_fusion.py", "--reps", "3")
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert list(rows) == ["tiny", "small"]
    for row in rows.values():
        assert float(row[6]) < 1e-4  # the fused GEMM computes the same gradients
        assert "% of" in row[7]


@pytest.mark.slow
def test_optimizer_benchmark_times_three_adamw_variants_that_agree():
    proc = run_benchmark("optimizers.py", "--reps", "2")
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert list(rows) == ["tiny", "small"]
    for row in rows.values():
        assert 5e-4 < float(row[6]) < 2e-3  # the optimizer really stepped: Adam moves weights by ~lr
        assert float(row[7]) < 1e-5  # and all three variants computed the same update


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the GPU check's steps at toy sizes, green on a CPU."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for name in ("throughput", "unit-tests", "notebooks", "cli-train"):
        assert f"{name}: ok in" in summary, summary
    assert "distributed-nccl: skipped (" in summary  # no GPUs: said so, not silently passed
    cli = (tmp_path / "cli-train.txt").read_text()
    assert "tokens/s" in cli and "of the measured fp32 matmul peak" in cli and "datasheet" in cli


@pytest.mark.slow
def test_throughput_compile_adds_paired_compiled_vs_eager_columns(tmp_path):
    # aot_eager traces both training steps through dynamo and AOTAutograd without generating
    # code, so this checks the --compile plumbing in seconds; inductor's speed is the notebook's
    # (12_profiling_and_compile) and gpu_check.sh's business.
    out = tmp_path / "t.json"
    proc = run_benchmark("throughput.py", "--sizes", "nano", "--reps", "5", "--warmup", "2", "--compile",
                         "--compile-backend", "aot_eager", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "+ compile (aot_eager)" in proc.stdout and "compiled/eager (95% CI)" in proc.stdout
    data = json.loads(out.read_text())
    assert data["compile"] == "aot_eager"
    (row,) = data["rows"]
    assert row["compile_low"] <= row["compile_speedup"] <= row["compile_high"]
    assert row["eager_tok_s"] > 0 and row["compile_s"] > 0  # the first compiled step traced the graph
    assert 0.2 < row["compile_speedup"] < 5  # the same maths, compiled or not


@pytest.mark.slow
def test_generation_benchmark_checks_equal_tokens_and_prints_the_speedup():
    proc = run_benchmark("generation.py", "--sizes", "nano", "--reps", "3")
    assert proc.returncode == 0, proc.stderr  # it exits non-zero if cached and uncached tokens differ
    (row,) = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| nano")]
    assert row[1].strip() == "16 + 16"  # half the 32-token context as prompt, half generated
    assert float(row[4].split("x")[0]) > 0
