#!/usr/bin/env bash
# CPU evidence, from the repository root (2-core machine; the runs take about an hour in all, one after another):
#   bash results/cpu/run.sh
# 1. the offline quick start of the README (--dataset shapes, tiny preset, both arms);
# 2. the benchmark at the tiny preset, eager and compiled arms;
# 3. the tiny comparison on the CIFAR-10 JPEG copy (../shared/data/cifar10-jpeg.tar.gz, unpacked to a temp dir).
set -euo pipefail
export PYTHONUNBUFFERED=1
R=results/cpu
d=$(mktemp -d); tar xzf ../shared/data/cifar10-jpeg.tar.gz -C "$d"
python train_cifar.py --preset tiny --dataset shapes --val-size 500 --sample-steps 20 --out $R/quickstart 2>&1 | tee $R/quickstart.log
python train_cifar.py --bench --compile --preset tiny --out $R/bench 2>&1 | tee $R/bench.log
python train_cifar.py --preset tiny --dataset folder --data-dir "$d/train" --val-dir "$d/test" --steps 1200 \
    --val-size 1000 --sample-steps 20 --out $R/cifar_tiny 2>&1 | tee $R/cifar_tiny.log
for f in $R/*/*/ckpt.pt; do mkdir -p "runs/$(dirname "$f")"; mv "$f" "runs/$f"; done   # keep, uncommitted
