#!/usr/bin/env bash
# Diagnostics (forward RMS, gradient RMS, block cosine, routing) of the depth sweep's final seed-0 checkpoints,
# which results/depth/run.sh keeps, uncommitted, under runs/. From the repository root (a few minutes):
#   bash results/depth/diagnose.sh          then: python results/depth/summarize.py
set -euo pipefail
d=$(mktemp -d); tar xzf ../shared/data/cifar10-jpeg.tar.gz -C "$d"
for depth in 16 8 4; do
    C=runs/results/depth/d${depth}_s0
    python tools/diagnose.py $C/residual/ckpt.pt $C/dar/ckpt.pt --dataset folder --data-dir "$d/test" \
        --val-size 256 --out results/depth/diagnostics_d$depth 2>&1 | tail -2
done
rm -rf "$d"
