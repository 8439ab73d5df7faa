#!/usr/bin/env bash
# The course's check on an offline CUDA machine (made for one H100/H200, torch 2.11, Python 3.12).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from a checkout of the repo
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: the same steps on CPU at toy sizes (~2 min)
#
# Steps, each under its own `timeout` (7 minutes in all at most; usually far less):
#   1. throughput: course_lib's GPT vs transformers' GPT-2 at GPT-2-small size (124M), bf16 autocast
#      and torch.compile, tokens/s and MFU against the measured bf16 matmul peak and the datasheet
#      989 TFLOP/s (dense bf16, H100/H200 SXM); run first, while the GPU is otherwise idle;
#   2. the unit and distributed tests (pytest, not the notebook/grading/browser ones);
#   3. every lesson notebook under nbval (GPU sizes: course_lib.device.device_profile() == "gpu").
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

if [[ $DRY_RUN == 1 ]]; then
  # Same commands, CPU and toy sizes: checks the script, not the GPU.
  THROUGHPUT_ARGS=(--device cpu --sizes nano --reps 2 --warmup 1 --threads 1)
  TESTS=(tests/test_monitoring.py tests/test_scaling.py)
  NOTEBOOKS=(notebooks/10_scaling_laws.ipynb)
  T_THROUGHPUT=120 T_TESTS=120 T_NOTEBOOKS=150
else
  THROUGHPUT_ARGS=(--device cuda --bf16 --compile --sizes gpt2 --batch 16 --reps 20 --warmup 3)
  TESTS=(tests -m "not notebooks and not grading and not browser")
  NOTEBOOKS=(notebooks/[0-9][0-9]_*.ipynb)
  T_THROUGHPUT=140 T_TESTS=110 T_NOTEBOOKS=170  # 7 minutes at most, plus set-up
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

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/environment.txt"

if [[ $DRY_RUN == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU visible to $PY: run this on the GPU machine, or use --dry-run here" >&2
  exit 2
fi

# Packages the tests and notebooks import; install the travelling wheels when any is missing.
missing=$("$PY" - <<'EOF'
import importlib.util
mods = ["nbval", "nbclient", "nbformat", "ipykernel", "ipywidgets", "wandb", "transformers", "pytest_timeout"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
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
step notebooks "$T_NOTEBOOKS" "$PY" -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
  --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 150 "${NB_PAR[@]}" "${NOTEBOOKS[@]}"

printf '%s\n' "== summary (outputs in $OUT)" "${STATUS[@]}" | tee "$OUT/summary.txt"
for s in "${STATUS[@]}"; do [[ $s == *": ok in"* ]] || exit 1; done
