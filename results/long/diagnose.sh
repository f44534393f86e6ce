#!/usr/bin/env bash
# The paper's three diagnostics (forward RMS growth, gradient RMS of the first over the last block, neighbouring
# blocks' cosine) of the deep, narrow run (issue 27), both arms at each kept step, on 256 test images; then the table
# beside the depth sweep's (results/long/diagnostics.md). From the repository root (a minute or two per step):
#   bash results/long/diagnose.sh KEEP DATA [STEP...]   KEEP: the kept checkpoints, <run>_<arm>_<step>.pt (made by
#        keep_ckpts.py: the run's code predates --keep-every); DATA: the unpacked JPEG copy; STEP: default all kept
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
keep=$1 d=$2; shift 2
run=w64_d24_s0
for step in ${*:-1000 2000 4000 6000 8000}; do
    [ -f $keep/${run}_residual_$step.pt ] && [ -f $keep/${run}_dar_$step.pt ] || { echo "step $step: not kept"; continue; }
    python tools/diagnose.py $keep/${run}_residual_$step.pt $keep/${run}_dar_$step.pt --dataset folder \
        --data-dir "$d/test" --val-size 256 --out results/long/$run/diagnostics_$step 2>&1 | tail -2
done
python results/long/diagnostics_table.py
