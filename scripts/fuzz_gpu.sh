#!/usr/bin/env bash
# The long GPU run of tests/test_fuzz.py (hypothesis profile ``gpu``: bf16 / fp8 K/V, random examples): the property
# tests in four groups run side by side (compiling new shapes is CPU-bound; the device machine has 16 cores), each
# with its own time limit, then one summary with the examples run and failures per test for VALIDATION.md.
# Usage: bash scripts/fuzz_gpu.sh [examples per test (default 250)] [per-group seconds (default 500)]
# Environment as scripts/device_tests.sh (wheels, hypothesis from .whl/extra/, system g++, the variant built).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/msa_out}; mkdir -p "$OUT/fuzz"
N=${1:-250}
LIMIT=${2:-500}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site LOCAL_KERNELS="flashrt/MiniMaxAI-msa-blackwell=$PWD"
GROUPS_K=("paged_decode or token_major" "prefill or build_k2q_csr" "topk or indexer or nvfp4" "invalid")
i=0
for k in "${GROUPS_K[@]}"; do
  (MSA_FUZZ_PROFILE=gpu MSA_FUZZ_EXAMPLES=$N timeout -k 10 "$LIMIT" python3 -m pytest tests/test_fuzz.py -q \
     -p no:cacheprovider -rfE --tb=short --hypothesis-show-statistics -k "$k" > "$OUT/fuzz/group$i.log" 2>&1
   echo "== [$k] rc=$?: $(tail -1 "$OUT/fuzz/group$i.log")" > "$OUT/fuzz/group$i.sum") &
  i=$((i + 1))
done
wait
{
  echo "fuzz_gpu: $N examples per property test, ${LIMIT}s per group; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?');"\
       "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1); $(date -u +%F)"
  cat "$OUT"/fuzz/group*.sum
  # per property test: "N passing, M failing, K invalid" from hypothesis' statistics
  cat "$OUT"/fuzz/group*.log | awk '
    /^tests\/test_fuzz.py::/ { t = $0; sub(/^tests\/test_fuzz.py::/, "", t); sub(/:$/, "", t); sub(/\[.*/, "", t) }
    / passing, [0-9]+ failing/ { n = split($0, w, " "); pass[t] += w[2]; fail[t] += w[4]; inv[t] += w[7] }
    END { for (t in pass) { printf "%s: %d passing, %d failing, %d invalid\n", t, pass[t], fail[t], inv[t];
                            P += pass[t]; F += fail[t] }
          printf "TOTAL examples passing %d, failing %d\n", P, F }'
  grep -hE "^(FAILED|ERROR)" "$OUT"/fuzz/group*.log | cut -c1-250 | head -20
} | tee "$OUT/fuzz_gpu.txt"
