#!/usr/bin/env bash
# The tiny comparison on the CIFAR-10 JPEG copy (2-core CPU, about 25 minutes), from the repository root:
# residual vs DAR static_t c4, 1,200 steps per arm, validation on 1,000 random test images of all classes.
set -euo pipefail
export PYTHONUNBUFFERED=1
R=results/cpu
d=$(mktemp -d); tar xzf ../shared/data/cifar10-jpeg.tar.gz -C "$d"
python train_cifar.py --preset tiny --dataset folder --data-dir "$d/train" --val-dir "$d/test" --steps 1200 \
    --val-size 1000 --sample-steps 20 --overwrite --out $R/cifar_tiny 2>&1 | tee $R/cifar_tiny.log
for f in $R/cifar_tiny/*/ckpt.pt $R/cifar_tiny/*/samples_000[0-9]*.png; do   # kept uncommitted, but the last grid
    case $f in *samples_0001200.png) continue ;; esac
    mkdir -p "runs/$(dirname "$f")"; mv "$f" "runs/$f"
done
rm -rf "$d"
