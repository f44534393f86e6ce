#!/usr/bin/env bash
# GPU cost evidence, second lease (issues 5 and 7), run from the repository root by the device tool ($OUT set):
#   bash results/gpu/cost.sh
# 1. mixing.py: eager MixSlots as a multiply and a sum (dar_minimal's CUDA form) vs cuBLAS batched matmuls;
# 2. the full eager benchmark of the code as committed (DiT-S/2, 32x32, batch 256, bf16);
# 3. the compiled benchmark: residual and DAR static_t c4, eager and torch.compile (compilation takes minutes).
# Each part has its own time limit and writes its files as soon as it ends, so a slow part loses only itself.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
W=$(mktemp -d)
S=${SIZE:-"--preset S --batch-size 256 --precision bf16"}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python -c "import torch; print('torch', torch.__version__)"; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"

timeout ${MIXING_TIMEOUT:-120} python results/gpu/mixing.py "$W" 8 2>&1 | tee "$OUT/mixing.log"
cp "$W/mixing.json" "$OUT/" 2>/dev/null

timeout ${EAGER_TIMEOUT:-150} python train_cifar.py --bench $S --bench-repeats 6 --out "$W/eager" 2>&1 \
    | tee "$OUT/bench_eager.log"
cp "$W/eager/bench.json" "$OUT/bench_eager.json" 2>/dev/null

timeout ${COMPILE_TIMEOUT:-300} python train_cifar.py --bench --compile $S --bench-repeats 8 --out "$W/compiled" 2>&1 \
    | tee "$OUT/bench_compiled.log"
cp "$W/compiled/bench.json" "$OUT/bench_compiled.json" 2>/dev/null
ls -la "$OUT"
