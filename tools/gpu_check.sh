#!/usr/bin/env bash
# Every GPU measurement of fedpose in one run that fits in 15 minutes of device time:
#   1. the data pipeline vs the model's training speed at 256x256 (fedpose bench data),
#   2. PoseResNet-50 training at 256x256 with real data loading, bf16 + channels_last, with the
#      share of the bf16 peak, and FedGH's server step at K = 100, P = 34 M (fedpose bench train),
#   3. the same training under torch.compile.
# Run from the repository root. Output: $OUT/gpu_check.log (or results/gpu_check.log).
#
#   tools/gpu_check.sh                     # on a CUDA machine, the paper-scale sizes
#   GPU_CHECK_TINY=1 DEVICE=cpu tools/gpu_check.sh   # the same steps at toy sizes, for CI/CPU
#
# Data: LSP from $LSP_ROOT, else data/lsp (copy ../shared/datasets/lsp there: 15 MB, ignored by
# git, and carry it to the device machine), else $FEDPOSE_DATASETS/lsp.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
LOG=${OUT:-results}/gpu_check.log
mkdir -p "$(dirname "$LOG")"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

LSP=${LSP_ROOT:-}
for candidate in data/lsp "${FEDPOSE_DATASETS:-../shared/datasets}/lsp"; do
    [[ -z "$LSP" && -f "$candidate/joints.mat" ]] && LSP=$candidate
done
if [[ -z "$LSP" ]]; then
    echo "error: no LSP dataset (set LSP_ROOT or copy it to data/lsp)" >&2
    exit 2
fi

if [[ -n "${GPU_CHECK_TINY:-}" ]]; then
    SIZE=64 MODEL=pose_resnet18 BATCH=4 STEPS=2 WORKERS=1 SAMPLES=16 K=4 P=100000 LIMIT=300
else
    SIZE=256 MODEL=pose_resnet50 BATCH=128 STEPS=30 WORKERS=0 SAMPLES=1024 K=100 P=34000000
    LIMIT=240
fi

run() {  # one measurement, bounded in time, logged with its command
    echo "\$ $*" | tee -a "$LOG"
    timeout "$LIMIT" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [[ $rc -ne 0 ]] && echo "(exit code $rc)" | tee -a "$LOG"
    echo | tee -a "$LOG"
}

{
    echo "# fedpose GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
    "$PYTHON" -c "import torch, os; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cores', len(os.sched_getaffinity(0)))"
    echo
} | tee "$LOG"

FEDPOSE=("$PYTHON" -m fedpose.cli bench)
run "${FEDPOSE[@]}" data --dataset lsp --root "$LSP" --input "$SIZE" --model "$MODEL" \
    --device "$DEVICE" --workers "$WORKERS" --batch 32 --samples "$SAMPLES" \
    --model-batch "$BATCH" --steps "$STEPS" --repeats 2
run "${FEDPOSE[@]}" train --dataset lsp --root "$LSP" --input "$SIZE" --model "$MODEL" \
    --device "$DEVICE" --workers "$WORKERS" --batch "$BATCH" --steps "$STEPS" \
    --fedgh-clients "$K" --fedgh-params "$P"
run "${FEDPOSE[@]}" train --dataset lsp --root "$LSP" --input "$SIZE" --model "$MODEL" \
    --device "$DEVICE" --workers "$WORKERS" --batch "$BATCH" --steps "$STEPS" --compile \
    --fedgh-params 0
echo "log: $LOG"
