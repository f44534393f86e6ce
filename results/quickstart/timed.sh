#!/usr/bin/env bash
# Times the README's quick-start commands as written (seed 0, default threads) on a quiet machine: the wall clock of
# the whole command (start-up, data, both arms, evaluation, picture) goes to results/quickstart/timed/<data>.json.
# From the repository root:  bash results/quickstart/timed.sh shapes|cifar [DATA]   (DATA: the unpacked JPEG copy,
# used for cifar in place of torchvision's download, which this machine cannot reach)
set -euo pipefail
R=results/quickstart/timed
mkdir -p $R
if [ "$1" = shapes ]; then src="--dataset shapes --image-size 16 --patch-size 2 --batch-size 32 --steps 800 --lr 2e-3"; else src="--dataset folder --data-dir $2/train --val-dir $2/test"; fi
SECONDS=0
python train_cifar.py --preset quick $src --overwrite --out $R/$1 2>&1 | tee $R/$1.log
echo "{\"wall_seconds\": $SECONDS, \"command\": \"python train_cifar.py --preset quick $src\"}" > $R/$1.json
rm -f $R/$1/*/ckpt.pt
