#!/usr/bin/env bash
# The CPU benchmark (issue 5) at the tiny preset, from the repository root on a quiet machine (about 25 minutes):
# every eager arm, then residual and DAR static_t c4 eager against torch.compile.
set -euo pipefail
export PYTHONUNBUFFERED=1
R=results/cpu
python train_cifar.py --bench --preset tiny --bench-repeats 20 --out $R/bench 2>&1 | tee $R/bench.log
python train_cifar.py --bench --compile --preset tiny --bench-repeats 20 --out $R/bench_compiled 2>&1 \
    | tee $R/bench_compiled.log
# The same arms at batch 128: the configuration issue 5 measured its naive aggregation at (width 128, 8 blocks,
# 64 tokens, batch 128); the tiny preset trains at batch 64.
python train_cifar.py --bench --preset tiny --batch-size 128 --bench-repeats 20 --out $R/bench_b128 2>&1 \
    | tee $R/bench_b128.log
