#!/usr/bin/env bash
# GPU evidence on a lent H100/H200, run from the repository root by the device tool (carry .gpudata holding a copy of
# ../shared/data/cifar10-jpeg.tar.gz; the tool sets $OUT). One part per call, each well inside the tool's 10 minutes:
#   bash results/gpu/run.sh paths    the command paths a GPU user takes, in miniature (a few minutes): a tiny random
#                                    AutoencoderKL encodes 2,000 CIFAR-10 JPEGs with --mirror; training on those
#                                    latents, bf16, compiled, --micro-batch, FID (classifier backend) and grids decoded;
#                                    tools/sample.py's .npz; a batch too large for the card ends in one line
#   bash results/gpu/run.sh bench    results/bench.py: DiT-S/2, 32x32, batch 256, bf16, residual and DAR static+t c4
#   STEP_MS=.. bash results/gpu/run.sh train
#                                    train_cifar.py --routing residual,dar --preset S on the CIFAR-10 JPEG copy, the
#                                    same number of steps per arm, sized so that the residual arm trains for about
#                                    $TRAIN_SECONDS seconds; its time limit is sized from the settings (below)
# DEVICE=cpu rehearses a part on the CPU, in miniature (results/gpu/rehearsal/README.md has the command). The tool returns at most 8 files: the training
# outputs come back as one tar.gz.
set -uo pipefail
export PYTHONUNBUFFERED=1
part=${1:-}
case "$part" in paths|bench|train) ;; *)
    echo "usage: bash results/gpu/run.sh paths|bench|train (got '${part}'); settings in the header of this script" >&2
    exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}; DATA=${DATA:-.gpudata/cifar10-jpeg.tar.gz}
PATH_STEPS=${PATH_STEPS:-200}; MODEL=${MODEL:-"--preset S"}; TRAIN_SECONDS=${TRAIN_SECONDS:-60}; VAL=${VAL:-2000}; REPEATS=${REPEATS:-10}
COMPILE_SECONDS=${COMPILE_SECONDS:-180}   # per arm: torch.compile of a DiT-S/2 arm, with room to spare
EVAL_SECONDS=${EVAL_SECONDS:-40}          # per arm: 8 evaluations on $VAL images and a sample grid
BENCH_FLAGS=${BENCH_FLAGS:-}              # e.g. --modes compiled (compilation takes minutes)
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python -c "import torch; print('torch', torch.__version__)"; } > "$OUT/machine_$part.txt"
cat "$OUT/machine_$part.txt"
[ -f "$DATA" ] || { echo "error: no CIFAR-10 JPEG copy at $DATA (carry .gpudata, or give DATA=FILE)" >&2; exit 1; }
d=$(mktemp -d); tar xzf "$DATA" -C "$d"

limited() {   # limited SECONDS WHAT COMMAND...: runs it under a time limit; past it, one line that says so
    local limit=$1 what=$2; shift 2
    timeout "$limit" "$@"; local rc=$?
    [ $rc -eq 124 ] && echo "error: $what ran past its limit of $limit s; see the settings in results/gpu/run.sh" >&2
    return $rc
}

if [ "$part" = paths ]; then
    W=$(mktemp -d)
    for c in "$d"/train/*/; do                                                       # 200 images per class
        mkdir -p "$W/imgs/$(basename "$c")"; find "$c" -type f | sort | head -200 | xargs cp -t "$W/imgs/$(basename "$c")"
    done
    python - "$W/vae" <<'EOF'
import sys, torch, diffusers
torch.manual_seed(0)     # a tiny random autoencoder: 32 x 32 images -> 4 x 16 x 16 latents; no weights to download
diffusers.AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4).save_pretrained(sys.argv[1])
EOF
    limited 120 "encoding" python tools/encode_latents.py "$W/imgs" "$W/z" --vae "$W/vae" --image-size 32 --mirror \
        --device "$DEVICE" 2>&1 | tr '\r' '\n' | tail -2 | tee "$OUT/paths.log"
    common=(--dataset latents --data-path "$W/z" --patch-size 2 --depth 4 --hidden-size 128 --num-heads 4
            --batch-size ${PATH_BATCH:-256} --micro-batch $((${PATH_BATCH:-256} / 4)) --precision bf16 --device "$DEVICE" --fid-backend classifier
            --fid-weights results/classifier/cifar10.pt --fid-samples ${PATH_FID:-1000} --sample-steps 10)
    limited ${PATH_LIMIT:-300} "training on latents" python train_cifar.py "${common[@]}" ${COMPILE:---compile} --routing residual,dar --steps $PATH_STEPS \
        --eval-every $((PATH_STEPS / 2)) --fid-every $((PATH_STEPS / 2)) --log-every $((PATH_STEPS / 4)) --out "$W/run" 2>&1 | grep -v "it/s" | tee -a "$OUT/paths.log"
    ls "$W"/run/*/samples_*.png | tee -a "$OUT/paths.log"
    limited 60 "sampling" python tools/sample.py "$W/run/dar/ckpt.pt" --num-samples ${PATH_FID:-1000} --sample-steps 10 \
        --device "$DEVICE" 2>&1 | tee -a "$OUT/paths.log"
    python -c "import numpy as np, sys; a = np.load(sys.argv[1])['arr_0']; print('npz arr_0', a.shape, a.dtype)" \
        "$W/run/dar/ckpt_samples${PATH_FID:-1000}.npz" | tee -a "$OUT/paths.log"
    if [ "$DEVICE" != cpu ]; then
        echo "a batch too large (expected: one line naming --micro-batch):" | tee -a "$OUT/paths.log"
        limited 120 "the out-of-memory check" python train_cifar.py "${common[@]}" --batch-size 262144 \
            --micro-batch 262144 --routing dar --steps 1 --fid-every 0 --out "$W/oom" 2>&1 | tail -1 | tee -a "$OUT/paths.log"
    fi
    cp "$W"/run/dar/samples_*$PATH_STEPS.png "$OUT/paths_dar_samples.png" 2>/dev/null
    (cd "$W" && tar czf "$OUT/paths_run.tar.gz" --exclude='*.pt' --exclude='*.npz' run)
fi

if [ "$part" = bench ]; then
    limited ${BENCH_TIMEOUT:-300} "the benchmark" python results/bench.py --depths 12 --hidden-size 384 --num-heads 6 \
        --patch-size 2 --batch-size 256 --precision bf16 --repeats $REPEATS $BENCH_FLAGS --out "$OUT" 2>&1 | tee "$OUT/bench.log"
fi

if [ "$part" = train ]; then
    W=$(mktemp -d)
    steps=$(python -c "print(max(80, int($TRAIN_SECONDS * 1000 / ${STEP_MS:-60}) // 80 * 80))")
    limit=$((2 * (COMPILE_SECONDS + TRAIN_SECONDS + EVAL_SECONDS) + 60))       # two arms, and a minute to start
    echo "residual step ${STEP_MS:-60} ms -> $steps training steps per arm; time limit $limit s"
    limited $limit "the training comparison" python train_cifar.py $MODEL --dataset folder --data-dir "$d/train" \
        --val-dir "$d/test" --routing residual,dar --precision bf16 --steps "$steps" --eval-every $((steps / 8)) \
        --val-size $VAL --ckpt-every 1000000 --log-every 100 --device "$DEVICE" --out "$W/train" 2>&1 | tee "$W/train.log"
    (cd "$W" && tar czf "$OUT/gpu_train.tar.gz" --exclude='*.pt' train train.log)
    cp "$W/train/compare.json" "$OUT/" 2>/dev/null
fi
ls -la "$OUT"
