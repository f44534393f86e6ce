#!/usr/bin/env bash
# GPU cost evidence (issues 5 and 7), run from the repository root by the device tool ($OUT set):
#   PARTS="eager mixing profile compiled compiled1 compiled28" bash results/gpu/cost.sh    (the default: all six)
# eager       the full eager benchmark of the code as committed (DiT-S/2, 32x32, batch 256, bf16);
# mixing      results/gpu/mixing.py: eager slot products as bmm or slot by slot (SUM_SLOTS, DOT_SLOTS);
# profile     results/gpu/profile_step.py: GPU kernel time and the top kernels of one eager step per arm;
# compiled    residual and DAR static_t c4, eager and torch.compile (compilation takes minutes);
# compiled1   the same with dense DAR (chunk 1);
# compiled28  the same at depth 28 with dense DAR (chunk 1).
# Each part has its own time limit and writes its files as soon as it ends, so a slow part loses only itself;
# with BUDGET=seconds no part runs past that many seconds after the start (for the device tool's 600 s box).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
W=$(mktemp -d)
S=${SIZE:-"--preset S --batch-size 256 --precision bf16"}
PARTS=${PARTS:-"eager mixing profile compiled compiled1 compiled28"}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python -c "import torch; print('torch', torch.__version__)"; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"
END=$(( $(date +%s) + ${BUDGET:-100000} ))
run() {   # run NAME TIMEOUT COMMAND...: the JSON the command writes in $W/NAME is copied to $OUT/NAME.json
    local name=$1 limit=$(( $2 < END - $(date +%s) ? $2 : END - $(date +%s) )); shift 2
    [ "$limit" -gt 10 ] || { echo "== $name: skipped, no time left" | tee -a "$OUT/cost.log"; return; }
    echo "== $name ($limit s): $*" | tee -a "$OUT/cost.log"
    timeout "$limit" "$@" 2>&1 | grep -v -e "warnings.warn" -e "softmax" -e "^$" | tee -a "$OUT/cost.log"
    cp "$W/$name"/*.json "$OUT/$name.json" 2>/dev/null
}
for part in $PARTS; do
    mkdir -p "$W/$part"
    case $part in
        eager)      run eager 150 python train_cifar.py --bench $S --bench-repeats 6 --out "$W/eager" ;;
        mixing)     run mixing 120 python results/gpu/mixing.py "$W/mixing" 6 12 ;;
        profile)    run profile 90 python results/gpu/profile_step.py "$W/profile" ;;
        compiled)   run compiled 300 python train_cifar.py --bench --compile $S --bench-repeats 8 --out "$W/compiled" ;;
        compiled1)  run compiled1 450 python train_cifar.py --bench --compile $S --dar-chunk 1 --bench-repeats 8 \
                        --out "$W/compiled1" ;;
        compiled28) run compiled28 300 python train_cifar.py --bench --compile $S --depth 28 --dar-chunk 1 \
                        --bench-repeats 5 --out "$W/compiled28" ;;
    esac
done
ls -la "$OUT"
