#!/usr/bin/env bash
# The paper's three diagnostics (forward RMS growth, gradient RMS of the first over the last block, neighbouring
# blocks' cosine) of a long run's kept checkpoints (issue 27), both arms (or DAR alone where the run borrows another
# run's residual) at each step, on 256 test images; then the table beside the depth sweep's (results/long/
# diagnostics.md). From the repository root (a minute or two per step on one thread):
#   bash results/long/diagnose.sh RUNS DATA RUN [STEP...]   RUNS: the runs' folder, <RUNS>/<run>/<arm>/ckpt_<step>.pt
#        (--keep-every) or <RUNS>/<run>_<arm>_<step>.pt (keep_ckpts.py, for w64_d24_s0 whose code predates
#        --keep-every); DATA: the unpacked JPEG copy; STEP: default 2000 4000 8000
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
runs=$1 d=$2 run=$3; shift 3
for step in ${*:-2000 4000 8000}; do
    ckpts=()
    for arm in residual dar; do
        for c in $runs/$run/$arm/ckpt_$(printf %07d $step).pt $runs/${run}_${arm}_$step.pt; do
            [ -f $c ] && ckpts+=($c) && break
        done
    done
    [ ${#ckpts[@]} -gt 0 ] || { echo "$run step $step: not kept"; continue; }
    python tools/diagnose.py "${ckpts[@]}" --dataset folder --data-dir "$d/test" --val-size 256 \
        --out results/long/$run/diagnostics_$step 2>&1 | tail -2
done
python results/long/diagnostics_table.py
