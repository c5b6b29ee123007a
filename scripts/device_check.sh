#!/usr/bin/env bash
# One batched GPU session on a lent machine (no network): install carried wheels (.whl/), build the
# variant with the machine's torch + nvcc, run the tests on the GPU and the benchmark tables.
# Usage: bash scripts/device_check.sh "<pytest args>" "<benchmark sections or 'none'>"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/msa_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, kernels; print('torch', torch.__version__, 'triton', triton.__version__, 'kernels', kernels.__version__)"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /'
t0=$(date +%s)
python3 scripts/build_variant.py > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
grep "build_variant" "$OUT/build.log"; echo "build took $(( $(date +%s) - t0 )) s"
export LOCAL_KERNELS="flashrt/MiniMaxAI-msa-blackwell=$PWD"
PYTEST_ARGS=${1:-"tests"}
SECTIONS=${2:-"topk,decode,prefill"}
rc=0
if [ "$PYTEST_ARGS" != "none" ]; then
  # shellcheck disable=SC2086
  timeout ${PYTEST_TIMEOUT:-400} python3 -m pytest $PYTEST_ARGS -q -rs -p no:cacheprovider --durations=15 2>&1 | tee "$OUT/pytest.log" | tail -60
  rc=${PIPESTATUS[0]}
fi
if [ "$SECTIONS" != "none" ]; then
  python3 benchmarks/benchmark.py --sections "$SECTIONS" 2>&1 | tee "$OUT/bench.log"
fi
exit $rc
