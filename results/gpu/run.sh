#!/usr/bin/env bash
# GPU evidence (issues 5 and 7), one call on a lent H100/H200, from the repository root:
#   device run:  bash results/gpu/run.sh        (carry .gpudata holding cifar10-jpeg.tar.gz; $OUT set by the tool)
# (a) the benchmark at DiT-S/2, 32x32, batch 256, bf16, eager and compiled, with the depth sweep;
# (b) train_cifar.py --routing residual,dar --preset S on the CIFAR-10 JPEG copy, the same number of steps per
#     arm, sized from the benchmark so that the residual arm trains for about $TRAIN_SECONDS seconds.
# Everything small that it measures is packed into $OUT/gpu_evidence.tar.gz (the tool returns at most 8 files).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
MODEL=${MODEL:-"--preset S"}; TRAIN_SECONDS=${TRAIN_SECONDS:-130}; VAL=${VAL:-2000}; REPEATS=${REPEATS:-10}
W=$(mktemp -d)
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; python -c "import torch; print('torch', torch.__version__)"; } > "$W/machine.txt"
cat "$W/machine.txt"
d=$(mktemp -d); tar xzf .gpudata/cifar10-jpeg.tar.gz -C "$d"

timeout 240 python train_cifar.py --bench $MODEL --batch-size 256 --precision bf16 --bench-repeats $REPEATS \
    --out "$W/bench" 2>&1 | tee "$W/bench.log"

step_ms=$(python -c "import json; print([r for r in json.load(open('$W/bench/bench.json'))['rows'] if r['arm']=='residual'][0]['median_ms'])" 2>/dev/null || echo 60)
steps=$(python -c "print(max(80, int($TRAIN_SECONDS * 1000 / $step_ms) // 80 * 80))")
echo "residual step ${step_ms} ms -> $steps training steps per arm"
timeout 420 python train_cifar.py $MODEL --dataset folder --data-dir "$d/train" --val-dir "$d/test" \
    --routing residual,dar --precision bf16 --steps "$steps" --eval-every $((steps / 8)) --val-size $VAL \
    --ckpt-every 1000000 --log-every 100 --out "$W/train" 2>&1 | tee "$W/train.log"

(cd "$W" && tar czf "$OUT/gpu_evidence.tar.gz" --exclude='*.pt' machine.txt bench bench.log train train.log)
ls -la "$OUT"
