#!/usr/bin/env bash
# compute-sanitizer over the GPU tests that feed adversarial ids / lengths / tables to the kernels
# (-1 anywhere, out-of-range and duplicate ids, shuffled and aliased page tables, req_to_token entries that wrap,
# lengths 0 and beyond the addressable storage, empty rows): decode, direct decode, prefill, indexer, top-k, CSR,
# the CUDA-graph replays of tests/test_cuda_graph.py (marker `sanitize`), and the hypothesis fuzz corpus of
# tests/test_fuzz.py (memcheck and racecheck). API.md 3.3/3.6: kernels MUST NOT fault or read out of bounds
# whatever ids they get.
#
# Usage: bash scripts/sanitize.sh [per-selection seconds (default 120)] [selection ...]
#   selections (default: all, in this order):
#     memcheck:  decode direct prefill indexer topk csr nvfp4 graphs fuzz
#     racecheck: fuzz_race graphs_race          (shared-memory hazards)
#   To stay within one 10-minute device command, run them in several calls, e.g.
#   "decode direct prefill indexer", "topk csr nvfp4 graphs", "fuzz", "fuzz_race graphs_race".
#   The fuzz corpus runs with MSA_FUZZ_PROFILE=$FUZZ_PROFILE (default medium) under memcheck and
#   $FUZZ_RACE_PROFILE (default ci) under racecheck; the graph tests with MSA_GRAPH_STEPS=2 and
#   MSA_GRAPH_REPLAYS=$GRAPH_REPLAYS (default 200) replays of the long-replay test.
# Environment as scripts/device_tests.sh: wheels into /tmp/site, system g++, scripts/build_variant.py, LOCAL_KERNELS;
# hypothesis from .whl/extra/ when the image lacks it (`pip download hypothesis sortedcontainers --no-deps -d
# .whl/extra --only-binary=:all: --python-version 3.X` per Python version; carry .whl). Writes $OUT/sanitize.txt
# (per-selection result, error count per tool, totals, a Markdown table for VALIDATION.md) and
# $OUT/sanitize_logs.tgz (full logs).
# Exit: 0 clean; 1 a tool reported errors; 2 no errors but a selection failed tests, timed out or produced no
#       sanitizer summary; 3 setup failure (build, no compute-sanitizer).
# Selections run without PyTorch's caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor is its own
# cudaMalloc, so an overrun past a tensor is caught); the graph selections keep the caching allocator because
# CUDA-graph capture allocates from a private pool of it, and racecheck (shared memory only) does not need it off.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/msa_out}; mkdir -p "$OUT"; LOGS=/tmp/msa_sanitize; rm -rf "$LOGS"; mkdir -p "$LOGS"
SUM="$OUT/sanitize.txt"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/kernels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site
# hypothesis (tests/test_fuzz.py) from .whl/extra/ when the image lacks it (the device machine has no network);
# .whl/extra/ may hold wheels for several Python versions: install the first one pip accepts
if ! python3 -c "import hypothesis" >/dev/null 2>&1; then
  for w in .whl/extra/sortedcontainers-*.whl .whl/extra/hypothesis-*.whl; do
    [ -f "$w" ] || continue
    case "$w" in *hypothesis-*) python3 -c "import hypothesis" >/dev/null 2>&1 && continue;; esac
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$w" >/dev/null 2>&1
  done
fi
# same reason as device_tests.sh: the image's default CXX cannot unwind c10::Error thrown from our .so
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
if ! python3 scripts/build_variant.py > "$LOGS/build.log" 2>&1; then
  { echo "build_variant.py failed:"; tail -40 "$LOGS/build.log"; } | tee "$SUM"; exit 3
fi
export LOCAL_KERNELS="flashrt/MiniMaxAI-msa-blackwell=$PWD"

CS=""
for c in "$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer" \
         "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda*/bin/compute-sanitizer; do
  if [ -n "$c" ] && [ -x "$c" ]; then CS=$c; break; fi
done
if [ -z "$CS" ]; then echo "compute-sanitizer not found (CUDA_HOME=$CUDA_HOME, PATH)" | tee "$SUM"; exit 3; fi
HELP=$("$CS" --help 2>&1 || true)
BASE_OPTS=(--print-limit 25 --error-exitcode 86)
# optional flags, only where this compute-sanitizer has them:
# torch probes the driver with calls that fail harmlessly (peer access, ...): report device errors only
grep -q -- "--report-api-errors" <<<"$HELP" && BASE_OPTS+=(--report-api-errors no)
declare -A TOOL_OPTS
TOOL_OPTS[memcheck]=""
# guard bytes after each allocation: an overrun lands in padding instead of a neighbouring buffer
grep -q -- "--padding" <<<"$HELP" && TOOL_OPTS[memcheck]="--padding 256"
TOOL_OPTS[racecheck]=""

LIMIT=${1:-120}
shift || true
SELECTIONS=("$@")
[ ${#SELECTIONS[@]} -eq 0 ] && SELECTIONS=(decode direct prefill indexer fp4_indexer topk csr nvfp4 graphs fuzz fuzz_race graphs_race)
FUZZ_PROFILE=${FUZZ_PROFILE:-medium}
FUZZ_RACE_PROFILE=${FUZZ_RACE_PROFILE:-ci}
GRAPH_REPLAYS=${GRAPH_REPLAYS:-200}
# WARM=1 (default): each selection first runs without the tool (not counted in its limit), so the sanitized run
# finds every Triton kernel compiled (compiling under memcheck alone can use a whole limit: the fuzz corpus reached
# 0 examples in 110 s on an H100). The fuzz profiles ci / medium are derandomized: both runs draw the same examples.
WARM=${WARM:-1}

# name, then "<tool> <caching|nocache> <pytest args...>" (-k: tests with adversarial ids, lengths or tables)
declare -A SEL
while read -r name spec; do [ -n "$name" ] && SEL[$name]=$spec; done <<'SELECTIONS'
decode      memcheck nocache tests/test_decode.py -k gqa_messy_ids|empty_rows_and_bad_ids|ragged_batch|multi_token_causal|multi_token_m_tiles|dense_path|strided_index_tensors|wrapper_dense_and_reference_semantics|fuzz_small|gpu_generic_cases_bf16
direct      memcheck nocache tests/test_decode_direct.py -k test_gqa|indirection_edge_cases|int64_indices_sink_scale|ragged_batch_64|block_sizes|packed_strided_cache|matches_official_bitwise
prefill     memcheck nocache tests/test_prefill.py -k prefill_dense_small|paged_equals_dense|page_bound|csr_set_semantics|prefill_empty_rows|prefill_gqa|prefill_gpu_topk
indexer     memcheck nocache tests/test_indexer.py -k decode_indexer_selection|decode_indexer_o_and_naive
fp4_indexer memcheck nocache tests/test_fp4_indexer.py -k scores_noncausal|scores_causal|alias_float|gpu_large_m3_shape|missing_and_bad_pages|gpu_ragged_batch_chunks_and_bad_pages
topk        memcheck nocache tests/test_topk.py -k random_ties_and_specials|distinct_scores|edge_lengths|single_block_and_all_invalid|forced_local_blocks|forced_more_than_topk|test_empty|non_contiguous_score|native_deterministic
csr         memcheck nocache tests/test_csr.py -k k2q_to_q2k_roundtrip|gpu_matches_cpu|gpu_reference_small
nvfp4       memcheck nocache tests/test_decode_nvfp4.py tests/test_prefill_nvfp4.py -k gqa_messy_ids|seqlen_q_2|split_and_non_split_plans|empty_rows_bad_ids|dense_path|strided_packed_cache|fused_small_fp16|fused_noncontiguous_inputs
graphs      memcheck caching tests/test_cuda_graph.py -m sanitize
fuzz        memcheck nocache tests/test_fuzz.py -m fuzz
fuzz_race   racecheck caching tests/test_fuzz.py -m fuzz
graphs_race racecheck caching tests/test_cuda_graph.py -m sanitize
SELECTIONS

{
  echo "compute-sanitizer: $CS ($("$CS" --version 2>/dev/null | grep -i version | head -1))"
  echo "options: ${BASE_OPTS[*]}; memcheck: ${TOOL_OPTS[memcheck]:-(none)}; racecheck: ${TOOL_OPTS[racecheck]:-(none)}"
  echo "fuzz profiles: memcheck $FUZZ_PROFILE, racecheck $FUZZ_RACE_PROFILE; graph long-replay count $GRAPH_REPLAYS"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- 2>/dev/null || echo ' (+local changes)'); date: $(date -u +%F)"
  echo "per-selection limit: ${LIMIT}s; device: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
} > "$SUM"

declare -A TOOL_ERR TOOL_WARN
TOOL_ERR[memcheck]=0; TOOL_ERR[racecheck]=0; TOOL_WARN[memcheck]=0; TOOL_WARN[racecheck]=0
BAD=0
TABLE=()
for name in "${SELECTIONS[@]}"; do
  spec=${SEL[$name]:-}
  if [ -z "$spec" ]; then echo "== $name: unknown selection" >> "$SUM"; BAD=1; continue; fi
  read -r -a words <<<"$spec"
  tool=${words[0]}; mode=${words[1]}; args=(); flag=""; expr=""
  for ((i = 2; i < ${#words[@]}; i++)); do
    case "${words[$i]}" in -k|-m) flag=${words[$i]}; expr=${words[$((i + 1))]}; break;; *) args+=("${words[$i]}");; esac
  done
  if [ "$flag" = "-k" ]; then args+=(-k "${expr//|/ or }"); elif [ -n "$flag" ]; then args+=("$flag" "$expr"); fi
  log="$LOGS/$name.log"
  envs=(MSA_GRAPH_STEPS=2 "MSA_GRAPH_REPLAYS=$GRAPH_REPLAYS")
  [ "$mode" = "nocache" ] && envs+=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  extra=()
  if [[ "$name" == fuzz* ]]; then
    if [ "$tool" = "racecheck" ]; then envs+=("MSA_FUZZ_PROFILE=$FUZZ_RACE_PROFILE"); else envs+=("MSA_FUZZ_PROFILE=$FUZZ_PROFILE"); fi
    extra=(--hypothesis-show-statistics)
  fi
  read -r -a topts <<<"${TOOL_OPTS[$tool]}"
  warm=""
  if [ "$WARM" = "1" ]; then  # same tests without the tool first: Triton's cache then holds every kernel they compile
    tw=$(date +%s)
    env "${envs[@]}" timeout -k 5 "$LIMIT" python3 -m pytest "${args[@]}" -q -p no:cacheprovider > "$log.warm" 2>&1
    warm="warm-up $(( $(date +%s) - tw ))s: $(tail -1 "$log.warm" | cut -c1-80)"
  fi
  t0=$(date +%s)
  env "${envs[@]}" timeout -k 15 "$LIMIT" "$CS" --tool "$tool" "${BASE_OPTS[@]}" "${topts[@]}" \
    python3 -m pytest "${args[@]}" -q -rfE --tb=short -p no:cacheprovider "${extra[@]}" > "$log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  summary=$(grep -E "^========= (ERROR|RACECHECK) SUMMARY: " "$log" | tail -2 | tr '\n' ' ')
  nwarn=0
  if grep -qE "^========= ERROR SUMMARY: [0-9]+ error" "$log"; then
    nerr=$(grep -E "^========= ERROR SUMMARY: [0-9]+ error" "$log" | tail -1 | sed -E 's/.*ERROR SUMMARY: ([0-9]+) error.*/\1/')
  elif grep -qE "^========= RACECHECK SUMMARY: .*\([0-9]+ error" "$log"; then
    nerr=$(grep -E "^========= RACECHECK SUMMARY: " "$log" | tail -1 | sed -E 's/.*\(([0-9]+) error.*/\1/')
  else  # killed before the summary: count the error reports printed so far
    nerr=$(grep -cE "^========= (Invalid|Out-of-range|Misaligned|Hardware|Program hit|Malloc|Leaked|Cuda|Barrier|Error: Race|Race reported)" "$log")
  fi
  if grep -qE "^========= RACECHECK SUMMARY: .*[0-9]+ warning" "$log"; then
    nwarn=$(grep -E "^========= RACECHECK SUMMARY: " "$log" | tail -1 | sed -E 's/.* ([0-9]+) warning.*/\1/')
  fi
  pyres=$(grep -E "[0-9]+ (passed|failed|error|errors|skipped|deselected)" "$log" | grep -v "^=========" | tail -1)
  examples=""
  if [ ${#extra[@]} -gt 0 ]; then  # hypothesis statistics: examples that ran (passing + failing) over all tests
    examples=$(grep -E "^ +- [0-9]+ passing, [0-9]+ failing" "$log" \
      | sed -E 's/^ +- ([0-9]+) passing, ([0-9]+) failing.*/\1 \2/' | awk '{p += $1; f += $2} END {print p + f " examples (" f " failing)"}')
  fi
  status=ok
  if [ "$nerr" -gt 0 ]; then status="${tool^^} ERRORS"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; BAD=1
  elif [ -z "$summary" ]; then status="NO SANITIZER SUMMARY (rc=$rc)"; BAD=1
  elif [ "$rc" -eq 5 ]; then status="NO TESTS SELECTED"; BAD=1
  elif [ "$rc" -ne 0 ]; then status="TESTS FAILED (rc=$rc)"; BAD=1
  elif ! grep -q " passed" <<<"$pyres"; then status="NOTHING RAN (all skipped: no GPU? no hypothesis?)"; BAD=1
  fi
  TOOL_ERR[$tool]=$(( ${TOOL_ERR[$tool]} + nerr ))
  TOOL_WARN[$tool]=$(( ${TOOL_WARN[$tool]} + nwarn ))
  TABLE+=("| $name | $tool | $status | $nerr | ${dt}s | ${pyres:-?}${examples:+; $examples} |")
  {
    wtxt=""; [ "$tool" = racecheck ] && wtxt=" (warnings: $nwarn)"
    echo "== $name [$tool, $mode]: $status; $tool errors: $nerr$wtxt; ${dt}s; pytest: ${pyres:-?}${examples:+; hypothesis: $examples}"
    echo "   cmd: ${envs[*]} pytest ${args[*]}"
    [ -n "$warm" ] && echo "   $warm"
    grep -E "^(FAILED|ERROR) " "$log" | cut -c1-250 | head -10 | sed 's/^/   /'
    if [ "$nerr" -gt 0 ]; then
      grep -E -A4 "^========= (Invalid|Out-of-range|Misaligned|Hardware|Program hit|Error: Race|Race reported)" "$log" \
        | cut -c1-250 | head -30 | sed 's/^/   /'
    fi
  } >> "$SUM"
done
TOTAL_ERR=$(( ${TOOL_ERR[memcheck]} + ${TOOL_ERR[racecheck]} ))
{
  echo "TOTAL memcheck errors: ${TOOL_ERR[memcheck]}"
  echo "TOTAL racecheck errors: ${TOOL_ERR[racecheck]} (racecheck warnings: ${TOOL_WARN[racecheck]})"
  echo
  echo "| selection | tool | result | errors | time | pytest |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${TABLE[@]}"
} >> "$SUM"
tar czf "$OUT/sanitize_logs.tgz" -C "$LOGS" .
cat "$SUM"
if [ "$TOTAL_ERR" -gt 0 ]; then exit 1; fi
if [ "$BAD" -ne 0 ]; then exit 2; fi
exit 0
