#!/usr/bin/env bash
# The h-next-to-v change of Push (commit b998e0c) against the version before it (b3035ac), one process, alternated
# steps (results/cpu/ab_versions.py), at the tiny preset's batch 64 and at batch 128. From the repository root.
set -euo pipefail
export PYTHONUNBUFFERED=1
OLD=$(mktemp --suffix=.py)
git show b3035ac:dar_minimal.py > "$OLD"
mkdir -p results/cpu/ab_h_next_to_v
for B in 64 128; do
    python results/cpu/ab_versions.py "$OLD" dar_minimal.py --batch-size $B --repeats 20 \
        | tee results/cpu/ab_h_next_to_v/b$B.log
done
rm "$OLD"
