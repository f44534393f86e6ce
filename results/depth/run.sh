#!/usr/bin/env bash
# Depth sweep (issue 8) on the 2-core CPU: residual vs DAR (static+t, chunk 4) at the tiny width (128, patch 4,
# batch 64, lr 3e-4, EMA 0.999) for 4, 8 and 16 blocks, seeds 0 and 1, 500 steps per arm, on the CIFAR-10 JPEG
# copy (../shared/data/cifar10-jpeg.tar.gz, unpacked to a temp dir). Validation: EMA weights, the same 1,000
# random test images and fixed noise at 8 t for every run. From the repository root (about 90 minutes):
#   bash results/depth/run.sh            then: python results/depth/summarize.py
# (d8_s0 was run twice: other work on the 2 cores slowed its first run; the rerun gave identical losses.)
set -euo pipefail
export PYTHONUNBUFFERED=1
R=results/depth
d=$(mktemp -d); tar xzf ../shared/data/cifar10-jpeg.tar.gz -C "$d"
for seed in 0 1; do
    for depth in 4 8 16; do
        o=$R/d${depth}_s$seed
        [ -f $o/compare.json ] && continue                     # finished earlier
        python train_cifar.py --preset tiny --depth $depth --seed $seed --dataset folder --data-dir "$d/train" \
            --val-dir "$d/test" --steps 500 --eval-every 100 --val-size 1000 --sample-steps 10 --overwrite --out $o > $o.log 2>&1
        for f in $o/*/ckpt.pt; do mkdir -p "runs/$(dirname "$f")"; mv "$f" "runs/$f"; done   # kept, uncommitted
    done
done
rm -rf "$d"
