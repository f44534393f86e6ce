#!/usr/bin/env bash
# Diagnostics (issue 4) of the final checkpoints of the tiny CIFAR-10 JPEG comparison made by results/cpu/run.sh
# (which keeps them, uncommitted, under runs/). Only validation images are needed: the test split serves as
# --data-dir, and the diagnostics use a deterministic held-out part of it.
set -euo pipefail
d=$(mktemp -d); tar xzf ../shared/data/cifar10-jpeg.tar.gz -C "$d"
C=runs/results/cpu/cifar_tiny
python tools/diagnose.py $C/residual/ckpt.pt $C/dar/ckpt.pt --dataset folder --data-dir "$d/test" \
    --val-size 256 --out results/cpu/diagnostics 2>&1 | tee results/cpu/diagnostics.log
