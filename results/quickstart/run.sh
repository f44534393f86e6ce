#!/usr/bin/env bash
# The quick start, three seeds (issue 17): residual vs DAR (static+t, chunk 4) at the `quick` preset (4 blocks,
# width 128, EMA 0.999, 4 evaluations on 200 validation images, a labelled sample grid at the end): on the built-in
# `shapes` data (16 x 16, patch 2) with batch 32, AdamW 2e-3, 800 steps, as the README's first command; on the CIFAR-10
# JPEG copy (32 x 32, patch 4) with the preset's batch 64, AdamW 1e-3, 400 steps. 64 tokens either way.
# Each run is the README's quick-start command with another seed. From the repository root, on a quiet machine
# (the times are part of the result):
#   bash results/quickstart/run.sh [DATA] [shapes|cifar ...]   DATA: the unpacked JPEG copy; default: unpacked to a temp dir
# LR=3e-4 bash results/quickstart/run.sh ... : the same at another learning rate, into <data>_lr<LR>_s<seed>/.
# SEEDS="1 2" bash results/quickstart/run.sh ... : only these seeds (default 0 1 2), e.g. to run seeds side by side.
# then: python results/quickstart/summarize.py
set -euo pipefail
export PYTHONUNBUFFERED=1
LR=${LR:-}
R=results/quickstart
d=${1:-}
if [ -z "$d" ]; then d=$(mktemp -d); tar xzf ../shared/data/cifar10-jpeg.tar.gz -C "$d"; fi
shift || true
for data in ${*:-shapes cifar}; do
    for seed in ${SEEDS:-0 1 2}; do
        o=$R/${data}${LR:+_lr$LR}_s$seed
        [ -f $o/compare.json ] && continue                                  # finished earlier
        if [ $data = shapes ]; then src="--dataset shapes --image-size 16 --patch-size 2 --batch-size 32 --steps 800 --lr 2e-3"; else
            src="--dataset folder --data-dir $d/train --val-dir $d/test"; fi
        SECONDS=0
        python train_cifar.py --preset quick $src ${LR:+--lr $LR} --seed $seed --overwrite --out $o > $o.log 2>&1
        echo "{\"wall_seconds\": $SECONDS}" > $o/wall.json                   # the whole command, start-up included
        rm -f $o/*/ckpt.pt                                                  # not committed
    done
done
