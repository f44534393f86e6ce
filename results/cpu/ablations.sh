#!/usr/bin/env bash
# Ablations (issue 6) at the tiny size, short budget: DAR's query (static, static+t, dynamic) and chunk size
# (1, 2, 4), each arm 300 steps on the CIFAR-10 JPEG copy with the same seed, data order and validation,
# compared at equal steps. From the repository root: bash results/cpu/ablations.sh
# Validation: 500 random test images of all classes (the same for every arm). About 20 minutes on 2 cores.
set -euo pipefail
export PYTHONUNBUFFERED=1
d=$(mktemp -d); tar xzf ../shared/data/cifar10-jpeg.tar.gz -C "$d"
R=results/cpu/ablations
common="--preset tiny --dataset folder --data-dir $d/train --val-dir $d/test --steps 300 --eval-every 50
        --val-size 500 --sample-steps 10 --overwrite"
python train_cifar.py $common --routing residual,dar --out $R/ref 2>&1 | tail -3      # residual and static_t c4
for a in "static 4" "dynamic 4" "static_t 1" "static_t 2"; do
    set -- $a
    python train_cifar.py $common --routing dar --dar-query $1 --dar-chunk $2 --out $R/${1}_c$2 2>&1 | tail -1
done
for f in $R/*/*/ckpt.pt $R/*/*/samples_00000*.png $R/*/*/samples_0000[12]*.png; do rm -f "$f"; done   # keep step 300
python - <<'PY'
import glob, json, os
rows = {}
for log in sorted(glob.glob("results/cpu/ablations/*/*/log.jsonl")):
    recs = [json.loads(l) for l in open(log)]
    cfg = json.load(open(os.path.join(os.path.dirname(log), "config.json")))["model"]
    name = "residual" if cfg["routing"] == "residual" else f"dar {cfg['dar_query']} c{cfg['dar_chunk']}"
    rows[name] = dict(val_loss={r["step"]: r["val_loss"] for r in recs if r["kind"] == "eval"},
                      train_seconds=sum(r["train_seconds"] for r in recs if r["kind"] == "done"))
json.dump(rows, open("results/cpu/ablations/ablations.json", "w"), indent=1)
for k, v in rows.items():
    print(k, {s: round(x, 4) for s, x in v["val_loss"].items()}, round(v["train_seconds"]), "s")
PY
