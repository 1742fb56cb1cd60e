#!/usr/bin/env bash
# The paper-size GPU benchmark (issue 14), prepared to run once on one H100/H200 in at most
# 8 minutes: the script keeps to a 450 s budget and this wrapper kills it at 480 s; results
# are written after every row to benchmarks/results/gpu_paper_cuda.{md,json}.
#
#   bash benchmarks/gpu.sh                            # the GPU run (needs torch with CUDA)
#   bash benchmarks/gpu.sh --smoke --device cpu       # the CPU rehearsal, tiny config (CI)
#
# Extra arguments go to benchmarks/gpu_speed.py (see --help); later ones win.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/GEM3DCore${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
if [[ " $* " != *" --device cpu "* ]]; then
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA GPU: run on a GPU machine, or add --smoke --device cpu for the CPU rehearsal")'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
exec timeout --signal=TERM --kill-after=10 480 "$PYTHON" benchmarks/gpu_speed.py --device cuda "$@"
