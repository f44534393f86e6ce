#!/usr/bin/env bash
# CPU evidence, from the repository root (2-core machine; the runs take about an hour in all, one after another):
#   bash results/cpu/run.sh
# 1. the benchmark: tiny width, batch 64, depths 4, 8 and 12, eager and compiled (results/bench.py);
# 2. the tiny comparison on the CIFAR-10 JPEG copy (results/cpu/cifar_tiny.sh; ../shared/data/cifar10-jpeg.tar.gz,
#    unpacked to a temp dir; rerun alone after later changes).
set -euo pipefail
export PYTHONUNBUFFERED=1
R=results/cpu
python results/bench.py --depths 4 8 12 --repeats 10 --out $R/bench 2>&1 | tee $R/bench.log
bash results/cpu/cifar_tiny.sh
for f in $R/*/*/ckpt.pt; do mkdir -p "runs/$(dirname "$f")"; mv "$f" "runs/$f"; done   # keep, uncommitted
