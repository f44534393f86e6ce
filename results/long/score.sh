#!/usr/bin/env bash
# Sample quality (issue 28) of the long runs' kept checkpoints: tools/score.py with the offline classifier of the
# CIFAR-10 JPEG copy (results/classifier/cifar10.pt): 2,000 class-conditional samples (Euler, 10 steps, guidance
# 1.5), their Frechet distance to 2,000 of the 10,000 test images in the classifier's features, and the share it
# recognises as their class. 4-8 minutes per checkpoint on one thread beside other work. From the repository root:
#   bash results/long/score.sh DATA OUT CKPT...   DATA: the unpacked JPEG copy; OUT: the JSON to write
#   FIRST=1 DRAWS=1 SAMPLES=1000 bash results/long/score.sh ...   the measure's own noise: draw FIRST (other noise),
#                                                                 other sample counts
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
d=$1 out=$2; shift 2
python tools/score.py "$@" --dataset folder --data-dir "$d/train" --val-dir "$d/test" --val-size 2000 \
    --fid-backend classifier --fid-weights results/classifier/cifar10.pt --fid-samples ${SAMPLES:-2000} \
    --sample-steps 10 --draws ${DRAWS:-1} --first-draw ${FIRST:-0} --device cpu --out "$out"
