#!/usr/bin/env bash
# The course's check on an offline CUDA machine (made for one H100/H200, torch 2.11, Python 3.12).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from a checkout of the repo
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: the same steps on CPU at toy sizes (~1-2 min)
#
# Steps, each under its own `timeout` (8 minutes in all at most on one GPU; usually far less):
#   1. throughput: course_lib's GPT vs transformers' GPT-2 at GPT-2-small size (124M), bf16 autocast
#      and torch.compile, tokens/s and MFU against the measured bf16 matmul peak and the datasheet
#      989 TFLOP/s (dense bf16, H100/H200 SXM); run first, while the GPU is otherwise idle;
#   2. the unit tests (pytest, not the notebook/grading/browser ones); on one GPU they include the
#      distributed tests, which then run over gloo (spawn() uses NCCL only with a GPU per rank);
#   3. the distributed tests over NCCL where 2+ GPUs are visible (skipped, and said so, on one);
#   4. every lesson notebook under nbval (GPU sizes: course_lib.device.device_profile() == "gpu");
#   5. a 60-second CLI training run (`python -m course_lib train`) in bf16, with --compile where the
#      CLI has it, stopped by SIGINT at the limit; tokens/s from its metrics.jsonl, and MFU against
#      the datasheet peak and against the bf16 matmul peak measured right after.
# Packages the machine lacks (nbval, ipykernel, wandb, ...) are installed from benchmarks/wheels/
# with --no-index; fetch them first, on a machine with network, with benchmarks/gpu_wheels.sh.
# Everything printed also goes to files under $OUT (default: a new folder in /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ $DRY_RUN == 1 && -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
OUT=${OUT:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 PYDEVD_DISABLE_FILE_VALIDATION=1 TRANSFORMERS_VERBOSITY=error

N_GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [[ $DRY_RUN == 1 ]]; then
  # Same commands, CPU and toy sizes: checks the script, not the GPU.
  THROUGHPUT_ARGS=(--device cpu --sizes nano --reps 2 --warmup 1 --threads 1)
  TESTS=(tests/test_gpu_path.py)
  NOTEBOOKS=(notebooks/10_scaling_laws.ipynb)
  CLI_ARGS=(--device cpu --preset nano --precision fp32 --micro-batch 4 --log-every 2)
  CLI_SECONDS=25 T_THROUGHPUT=120 T_TESTS=120 T_NCCL=60 T_NOTEBOOKS=150
else
  THROUGHPUT_ARGS=(--device cuda --bf16 --compile --sizes gpt2 --batch 16 --reps 20 --warmup 3)
  MARKS="not notebooks and not grading and not browser"
  [[ $N_GPUS -ge 2 ]] && MARKS="$MARKS and not distributed"  # they get their own step, over NCCL
  TESTS=(tests -m "$MARKS")
  NOTEBOOKS=(notebooks/[0-9][0-9]_*.ipynb)
  CLI_ARGS=(--device cuda --preset small --precision bf16 --micro-batch 32 --log-every 10)
  CLI_SECONDS=60 T_THROUGHPUT=100 T_TESTS=110 T_NCCL=120 T_NOTEBOOKS=170  # 8 minutes at most on one GPU
fi

STATUS=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt, record the result
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  local verdict=ok
  if [[ $rc == 124 || $rc == 137 ]]; then verdict="TIMED OUT"; elif [[ $rc != 0 ]]; then verdict="FAILED (exit $rc)"; fi
  STATUS+=("$name: $verdict in $((SECONDS - t0)) s")
}
skip() {  # skip NAME REASON: say so, in the log and in the summary
  echo "== $1: skipped: $2" | tee "$OUT/$1.txt"
  STATUS+=("$1: skipped ($2)")
}

cli_run() {  # cli_run SECONDS TRAIN-ARGS...: train until SIGINT at SECONDS, then report tokens/s and MFU
  local seconds=$1; shift
  local run=$OUT/cli-run compile=()
  if "$PY" -m course_lib train --help | grep -q -- --compile; then
    if [[ $DRY_RUN == 1 ]]; then echo "--compile available (not used on CPU: compiling would fill the run)"
    else compile=(--compile); fi
  else
    echo "this CLI has no --compile: training eagerly"
  fi
  rm -rf "$run"
  timeout -s INT --kill-after=30 "$seconds" "$PY" -m course_lib train --out "$run" --steps 1000000 \
    --eval-every 0 --checkpoint-every 0 --no-progress "${compile[@]}" "$@"
  local rc=$?
  [[ $rc == 0 || $rc == 124 ]] || return "$rc"  # 124: stopped at the time limit, as planned
  "$PY" - "$run" "$@" <<'PYEOF'
import json
import sys
from pathlib import Path

import torch

from course_lib.model import GPT, GPTConfig
from course_lib.monitoring import datasheet_peak_flops, measure_matmul_flops, read_jsonl
from course_lib.precision import DTYPES

run, args = Path(sys.argv[1]), sys.argv[2:]
device = torch.device(args[args.index("--device") + 1])
precision = args[args.index("--precision") + 1]
records = [r for r in read_jsonl(run / "metrics.jsonl") if "tokens_per_s" in r]
if len(records) < 4:
    sys.exit(f"only {len(records)} metric records in {run.name}/metrics.jsonl: too few to measure")
with torch.device("meta"):
    model = GPT(GPTConfig(**json.loads((run / "config.json").read_text())["model"]))
steady = sorted(r["tokens_per_s"] for r in records[len(records) // 4:])  # first quarter: compile, warm-up
rate = steady[len(steady) // 2]
achieved = rate * model.flops_per_token()
measured = measure_matmul_flops(device, DTYPES[precision])
sheet = datasheet_peak_flops(device, precision)
print(f"cli train: {records[-1]['step']} steps in the time limit; median {rate:,.0f} tokens/s over the last "
      f"{len(steady)} records ({achieved / 1e12:.3f} TFLOP/s of model maths)")
print(f"MFU {achieved / measured:.1%} of the measured {precision} matmul peak ({measured / 1e12:.2f} TFLOP/s)")
print(f"MFU {achieved / sheet:.1%} of the datasheet {precision} peak ({sheet / 1e12:.0f} TFLOP/s)" if sheet
      else "MFU against the datasheet: no datasheet peak known for this device")
PYEOF
}
export -f cli_run
export PY OUT DRY_RUN

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.cuda.is_available(), '| GPUs', torch.cuda.device_count())"
} 2>&1 | tee "$OUT/environment.txt"

if [[ $DRY_RUN == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU visible to $PY: run this on the GPU machine, or use --dry-run here" >&2
  exit 2
fi

# Packages the tests and notebooks import; install the travelling wheels when any is missing.
missing=$("$PY" - <<'PYEOF'
import importlib.util
mods = ["nbval", "nbclient", "nbformat", "ipykernel", "ipywidgets", "wandb", "transformers", "pytest_timeout"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
PYEOF
)
if [[ -n "$missing" ]]; then
  echo "missing: $missing"
  if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir benchmarks/wheels/*.whl 2>&1 | tail -3
  else
    echo "no wheels in benchmarks/wheels/: run benchmarks/gpu_wheels.sh on a machine with network first" >&2
    exit 2
  fi
fi

# Notebooks and test files in parallel where pytest-xdist is installed; loadfile/loadscope keep each
# file (each notebook's cells, in order) on one worker, as nbval's README asks. GPU_CHECK_WORKERS
# sets the worker count (default 6 on the GPU machine; the dry run stays serial unless it is set).
TEST_PAR=() NB_PAR=()
WORKERS=${GPU_CHECK_WORKERS:-$([[ $DRY_RUN == 0 ]] && echo 6)}
if [[ -n "$WORKERS" ]] && "$PY" -c "import xdist" 2>/dev/null; then
  TEST_PAR=(-n "$WORKERS" --dist loadfile) NB_PAR=(-n "$WORKERS" --dist loadscope)
fi

step throughput "$T_THROUGHPUT" "$PY" benchmarks/throughput.py "${THROUGHPUT_ARGS[@]}" --json "$OUT/throughput.json"
step unit-tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider --timeout 100 "${TEST_PAR[@]}" "${TESTS[@]}"
if [[ $N_GPUS -ge 2 ]]; then
  step distributed-nccl "$T_NCCL" "$PY" -m pytest -q -p no:cacheprovider --timeout 100 -m distributed tests
elif [[ $DRY_RUN == 1 ]]; then
  skip distributed-nccl "dry run on CPU: no NCCL"
else
  skip distributed-nccl "$N_GPUS GPU(s) visible: NCCL needs a GPU per rank, 2 or more; the distributed tests ran over gloo in unit-tests"
fi
step notebooks "$T_NOTEBOOKS" "$PY" -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
  --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 150 "${NB_PAR[@]}" "${NOTEBOOKS[@]}"
step cli-train $((CLI_SECONDS + 45)) bash -c 'cli_run "$@"' cli_run "$CLI_SECONDS" "${CLI_ARGS[@]}"

printf '%s\n' "== summary (outputs in $OUT)" "${STATUS[@]}" | tee "$OUT/summary.txt"
for s in "${STATUS[@]}"; do [[ $s == *": ok in"* || $s == *": skipped ("* ]] || exit 1; done
