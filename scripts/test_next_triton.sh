#!/usr/bin/env bash
# Forward-compatibility check (CI, CPU): the interpreter's fast test subset (pytest -m kernels_ci) under the
# newest Triton on the package index, in a second environment (.venv-next: CPU torch 2.13.0 + latest triton),
# importing the package from the source tree (no build: native ops take their PyTorch fallbacks); then the decode
# kernel's AOT compile check (scripts/aot_check.py) under that Triton.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-next/bin/python ]; then
  "$PY" -m venv .venv-next || exit 1
fi
.venv-next/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1
.venv-next/bin/python -m pip install -q "torch==2.13.0" pytest pytest-xdist numpy hypothesis || exit 1
.venv-next/bin/python -m pip install -q --upgrade --no-deps triton || exit 1
.venv-next/bin/python -c "import torch, triton; print(f'[next-triton] torch {torch.__version__}, triton {triton.__version__}')"
NW=$(.venv-next/bin/python -c 'import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))')
MSA_TEST_SOURCE_TREE=1 TRITON_INTERPRET=1 .venv-next/bin/python -m pytest tests -m kernels_ci -q -p no:cacheprovider -n "$NW" \
  --ignore=tests/test_aot_compile.py --ignore=tests/test_layout.py --ignore=tests/test_package.py "$@"
rc=$?
# AOT compile check of the decode kernel under the newest Triton (its launch table depends on the Triton version:
# decode_kernel.TRITON_CONFIG_OVERRIDES): sm_90 + sm_120, CI subset, no spill in the MMA loop (~4.5 min on 2 cores)
.venv-next/bin/python scripts/aot_check.py --arch 90 --arch 120 --module decode_kernel || rc=1
exit $rc
