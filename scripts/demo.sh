#!/usr/bin/env bash
# README command 1: set up the environment, build the variant, run the main job (the MSA demo and,
# on a GPU, the benchmark tables). Without a GPU it runs through the Triton interpreter on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
# shellcheck disable=SC1091
. .venv/bin/activate
export LOCAL_KERNELS="flashrt/MiniMaxAI-msa-blackwell=$PWD"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
python scripts/demo.py "$@"
