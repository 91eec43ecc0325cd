#!/usr/bin/env bash
# The whole GPU sweep in one call of a few minutes (about 7 min of sweep at most, --time-budget-s).
#
#   benchmarks/gpu_sweep.sh              # on a CUDA machine: results in $OUT/gpu (or a temp dir)
#   benchmarks/gpu_sweep.sh --dry-run    # on a CPU: the same plan shrunk 32x in N, in $OUT/dry
#   benchmarks/gpu_sweep.sh -- --providers fused triton floor   # extra bench.py arguments
#
# Needs python3 with torch (and triton for the triton backend and do_bench timing); mgll is
# taken from ./src, so nothing is installed.  open_clip is used when installed, else skipped.
# Writes at most 8 files: results.json/.csv/.md, 4 PNG plots and bench.log.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # real kernels on the GPU
OUT=${OUT:-$(mktemp -d)}

if [[ $dry == 1 ]]; then
    dest="$OUT/dry"
    mkdir -p "$dest"
    "$PYTHON" benchmarks/bench.py --dry-run --out "$dest" "$@" 2>&1 | tee "$dest/bench.log"
else
    dest="$OUT/gpu"
    mkdir -p "$dest"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
    "$PYTHON" benchmarks/bench.py --preset gpu --device cuda --out "$dest" "$@" 2>&1 | tee "$dest/bench.log"
fi
echo "results: $dest"
cat "$dest/results.md"
