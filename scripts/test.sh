#!/usr/bin/env bash
# README command 2: set up the environment, build the variant, run the test suite.
# On a GPU machine every test runs; without a GPU the Triton kernels run through the interpreter
# (TRITON_INTERPRET=1, set by tests/conftest.py) and GPU-only tests skip. Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
# shellcheck disable=SC1091
. .venv/bin/activate
export LOCAL_KERNELS="flashrt/MiniMaxAI-msa-blackwell=$PWD"
python -m pytest tests -q -rs "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests for this selection (exit 5); treating as success"
  rc=0
fi
exit "$rc"
