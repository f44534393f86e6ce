#!/usr/bin/env bash
# GPU evidence on a lent H100/H200, run from the repository root by the device tool
# (carry .gpudata holding a copy of ../shared/data/cifar10-jpeg.tar.gz; the tool sets $OUT):
#   bash results/gpu/run.sh all            both parts below, the training sized from the benchmark
#   bash results/gpu/run.sh bench          the benchmark (results/bench.py): DiT-S/2, 32x32, batch 256, bf16,
#                                          residual and DAR static+t c4, eager and compiled
#   STEP_MS=.. bash results/gpu/run.sh train
#                                          train_cifar.py --routing residual,dar --preset S on the CIFAR-10 JPEG
#                                          copy, the same number of steps per arm, sized from the residual step
#                                          time so that the residual arm trains for about $TRAIN_SECONDS seconds
# The tool returns at most 8 files, so the training outputs come back as one tar.gz.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
MODEL=${MODEL:-"--preset S"}; TRAIN_SECONDS=${TRAIN_SECONDS:-100}; VAL=${VAL:-2000}; REPEATS=${REPEATS:-10}
BENCH_FLAGS=${BENCH_FLAGS:-}      # e.g. --modes compiled (compilation takes minutes)
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python -c "import torch; print('torch', torch.__version__)"; } > "$OUT/machine_$1.txt"
cat "$OUT/machine_$1.txt"

if [ "$1" = bench ] || [ "$1" = all ]; then
    timeout ${BENCH_TIMEOUT:-300} python results/bench.py --depths 12 --hidden-size 384 --num-heads 6 --patch-size 2 \
        --batch-size 256 --precision bf16 --repeats $REPEATS $BENCH_FLAGS --out "$OUT" 2>&1 | tee "$OUT/bench.log"
    STEP_MS=$(python -c "import json; print([r for r in json.load(open('$OUT/bench.json'))['rows'] if r['arm'].startswith('d12 residual')][-1]['median_ms'])")
fi

if [ "$1" = train ] || [ "$1" = all ]; then
    d=$(mktemp -d); tar xzf .gpudata/cifar10-jpeg.tar.gz -C "$d"
    W=$(mktemp -d)
    steps=$(python -c "print(max(80, int($TRAIN_SECONDS * 1000 / ${STEP_MS:-60}) // 80 * 80))")
    echo "residual step ${STEP_MS:-60} ms -> $steps training steps per arm"
    timeout 330 python train_cifar.py $MODEL --dataset folder --data-dir "$d/train" --val-dir "$d/test" \
        --routing residual,dar --precision bf16 --steps "$steps" --eval-every $((steps / 8)) --val-size $VAL \
        --ckpt-every 1000000 --log-every 100 --out "$W/train" 2>&1 | tee "$W/train.log"
    (cd "$W" && tar czf "$OUT/gpu_train.tar.gz" --exclude='*.pt' train train.log)
    cp "$W/train/compare.json" "$OUT/" 2>/dev/null
fi
ls -la "$OUT"
