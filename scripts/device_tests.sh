#!/usr/bin/env bash
# GPU test pass on a lent machine, one pytest run per file (each with its own time limit), per-file logs.
# Usage: bash scripts/device_tests.sh "test_a.py test_b.py" [per-file seconds]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/msa_out}; mkdir -p "$OUT"; LOGS=/tmp/msa_logs; mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/kernels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site
# The image's default CXX (/opt/gcc) links a libstdc++ that cannot unwind c10::Error thrown from our .so
# (segfault on any TORCH_CHECK failure); build with the system compiler torch itself is ABI-compatible with.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
echo "CXX=${CXX:-unset} ($(${CXX:-g++} --version | head -1))"
python3 scripts/build_variant.py > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; exit 1; }
export LOCAL_KERNELS="flashrt/MiniMaxAI-msa-blackwell=$PWD"
LIMIT=${2:-150}
run_one() {
  local f=$1 t0 rc
  t0=$(date +%s)
  timeout "$LIMIT" python3 -m pytest "tests/$f" -q -rfE --tb=short -p no:cacheprovider > "$LOGS/${f%.py}.log" 2>&1
  rc=$?
  { echo "== $f rc=$rc $(( $(date +%s) - t0 ))s: $(tail -1 "$LOGS/${f%.py}.log")"
    grep -E "^(FAILED|ERROR)" "$LOGS/${f%.py}.log" | cut -c1-300 | head -25; } > "$LOGS/${f%.py}.sum"
}
for f in $1; do
  if [ "${PAR:-0}" = "1" ]; then run_one "$f" & else run_one "$f"; fi
done
wait
for f in $1; do cat "$LOGS/${f%.py}.sum"; done
tar czf "$OUT/logs.tgz" -C "$LOGS" .
