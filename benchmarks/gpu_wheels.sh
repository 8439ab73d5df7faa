#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh installs on an offline CUDA machine.
#
# Run this on a machine WITH network (any OS/CPU: pip fetches the target's wheels); it fills
# benchmarks/wheels/ (git-ignored) with Python 3.12 / manylinux x86-64 wheels, --no-deps, of the
# packages the target lacks. Copy the folder beside the script (or carry it) to the GPU machine.
#
# The list is what the course's tests and notebooks import (nbval, nbclient, ipykernel,
# ipywidgets, wandb) and everything they need, less what the target image already ships
# (its torch/transformers/peft/tokenizers/matplotlib/pytest stack). Versions are the pins of
# requirements.txt and the versions those resolve to. Add a line when the target lacks more.
set -euo pipefail
PY=${PYTHON:-python3}
[[ -e $PY ]] && PY=$(realpath "$PY")  # a path given relative to where the script was started
cd "$(dirname "$0")"
PYVER=${GPU_PYTHON_VERSION:-3.12}
DEST=wheels
mkdir -p "$DEST"

PACKAGES=(
  nbval==0.11.0 nbclient==0.11.0 nbformat==5.11.1 ipykernel==7.4.0 ipywidgets==8.1.9 wandb==0.31.0
  annotated-types==0.8.0 asttokens==3.0.2 comm==0.2.3 cwevals==0.0.1b1 debugpy==1.8.22 distro==1.9.0
  executing==2.3.0 fastjsonschema==2.22.3 googleapis-common-protos==1.76.0 ipython==9.18.1
  ipython-pygments-lexers==1.1.1 jedi==0.20.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  jupyter-client==8.10.0 jupyter-core==5.9.1 jupyterlab-widgets==3.0.17 matplotlib-inline==0.2.2
  nest-asyncio2==1.7.4 opentelemetry-api==1.45.2 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2 parso==0.8.7 pexpect==4.9.0 platformdirs==4.14.8
  prompt-toolkit==3.0.53 ptyprocess==0.7.0 pure-eval==0.2.4 pydantic==2.14.4 pydantic-core==2.50.5
  pyzmq==27.3.0 referencing==0.37.0 rpds-py==2026.9.1 sniffio==1.3.1 stack-data==0.6.3 tornado==6.6.1
  traitlets==5.16.1 typing-inspection==0.4.5 wcwidth==0.9.4 widgetsnbextension==4.0.16
)

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 linux_x86_64; do
  PLATFORMS+=(--platform "$p")
done

"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in benchmarks/$DEST"
