#!/usr/bin/env bash
# GPU cost evidence (issues 5 and 7), run from the repository root by the device tool ($OUT set):
#   PARTS="mixing eager compiled compiled28" bash results/gpu/cost.sh       (the default: all four)
# mixing      results/gpu/mixing.py: eager MixSlots as bmm or as a multiply and a sum, by GPU_SUM_SLOTS;
# eager       the full eager benchmark of the code as committed (DiT-S/2, 32x32, batch 256, bf16);
# compiled    residual and DAR static_t c4, eager and torch.compile (compilation takes minutes);
# compiled28  the same at depth 28 with dense DAR (chunk 1).
# Each part has its own time limit and writes its files as soon as it ends, so a slow part loses only itself.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
W=$(mktemp -d)
S=${SIZE:-"--preset S --batch-size 256 --precision bf16"}
PARTS=${PARTS:-"mixing eager compiled compiled28"}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python -c "import torch; print('torch', torch.__version__)"; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"
run() {   # run NAME TIMEOUT COMMAND...: the command's bench.json (or mixing.json) is copied to $OUT/NAME.json
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$OUT/cost.log"
    timeout "$limit" "$@" 2>&1 | grep -v -e "warnings.warn" -e "softmax" -e "^$" | tee -a "$OUT/cost.log"
    cp "$W/$name"/*.json "$OUT/$name.json" 2>/dev/null
}
for part in $PARTS; do
    mkdir -p "$W/$part"
    case $part in
        mixing)     run mixing 150 python results/gpu/mixing.py "$W/mixing" 6 ;;
        eager)      run eager 150 python train_cifar.py --bench $S --bench-repeats 6 --out "$W/eager" ;;
        compiled)   run compiled 300 python train_cifar.py --bench --compile $S --bench-repeats 8 --out "$W/compiled" ;;
        compiled28) run compiled28 300 python train_cifar.py --bench --compile $S --depth 28 --dar-chunk 1 \
                        --bench-repeats 5 --out "$W/compiled28" ;;
    esac
done
ls -la "$OUT"
