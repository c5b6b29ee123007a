#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned development dependencies and build this machine's variant
# (build/torch<XY>-cxx11-cu<XYZ>-<arch>-linux/) without Nix. Idempotent: a second run is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup_env] creating .venv"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch, triton, kernels, pytest, xdist, hypothesis, numpy, setuptools, ninja" >/dev/null 2>&1 \
   || ! python -c "import kernels, torch, sys; sys.exit(0 if kernels.__version__ == '0.17.2' and torch.version.cuda else 1)" >/dev/null 2>&1; then
  echo "[setup_env] installing requirements-dev.txt (torch CUDA build, Triton, kernels 0.17.2, hypothesis, ...)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements-dev.txt
fi
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then export CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
python scripts/build_variant.py
