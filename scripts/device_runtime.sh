#!/usr/bin/env bash
# Device session helper: build this tree (and .base/, a checkout of the baseline commit, when present) and
# run the runtime benchmark section on both, then the given GPU test files on this tree.
# Usage: bash scripts/device_runtime.sh "test_a.py test_b.py" [sections]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/msa_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
python3 scripts/build_variant.py > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; } &
if [ -d .base ]; then (cd .base && python3 scripts/build_variant.py > "$OUT/build_base.log" 2>&1) & fi
wait
SECTIONS=${2:-runtime}
if [ -d .base ]; then
  (cd .base && LOCAL_KERNELS="flashrt/MiniMaxAI-msa-blackwell=$PWD" timeout 210 python3 benchmarks/benchmark.py \
     --sections runtime_base > "$OUT/bench_base.log" 2>&1); echo "== base bench rc=$?"
  grep -v "^row\|^lat\|^eager\|^idx" "$OUT/bench_base.log" | tail -60
fi
export LOCAL_KERNELS="flashrt/MiniMaxAI-msa-blackwell=$PWD"
timeout 240 python3 benchmarks/benchmark.py --sections "$SECTIONS" > "$OUT/bench.log" 2>&1; echo "== bench rc=$?"
grep -v "^row\|^lat\|^eager\|^idx" "$OUT/bench.log" | tail -80
for f in $1; do
  timeout 100 python3 -m pytest "tests/$f" -q -x -p no:cacheprovider > "$OUT/${f%.py}.log" 2>&1
  echo "== $f rc=$?: $(tail -1 "$OUT/${f%.py}.log")"; grep -E "^(FAILED|ERROR)" "$OUT/${f%.py}.log" | head -5
done
