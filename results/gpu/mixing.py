"""Eager DAR on a GPU: the slot products (sums and dots) slot by slot up to N slots, by cuBLAS bmm beyond.

    python results/gpu/mixing.py OUT_DIR [REPEATS] [DEPTHS]   (DiT-S/2, 32x32, batch 256, bf16; DEPTHS e.g. 12,28)

The forms are the same code apart from dar_minimal.SUM_SLOTS and DOT_SLOTS (N = 0: always bmm; 1000: always slot
by slot), set before every step; arms alternated in one process, two warm-up rounds, medians with min-max, ratios to the
residual arm of the same depth.
"""
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
import dar_minimal  # noqa: E402
from train_cifar import bench_setup, machine, parse_args  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "."
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 8
cuda = torch.cuda.is_available()
size = ["--preset", "S", "--batch-size", "256", "--precision", "bf16"] if cuda else \
       ["--preset", "tiny", "--batch-size", "8", "--image-size", "16", "--hidden-size", "32", "--device", "cpu"]
args = parse_args(size + ["--out", out])
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
DEPTHS = [int(d) for d in sys.argv[3].split(",")] if len(sys.argv) > 3 else [12, 28]
FORMS = {"bmm": 0, "sum<=2": 2, "sum<=4": 4, "sum<=8": 8, "sum": 1000}
arms = []                                                  # (label, overrides, SUM_SLOTS, reference label)
for depth in DEPTHS:
    ref = f"depth {depth} residual"
    arms.append((ref, dict(depth=depth, routing="residual"), 0, ref))
    for S in ((4, 1) if depth == 12 else (1, 4)):
        for form, slots in FORMS.items():
            arms.append((f"depth {depth} dar static_t c{S} {form}",
                         dict(depth=depth, dar_query="static_t", dar_chunk=S), slots, ref))
steps = {label: bench_setup(args, o, False)[1] for label, o, _, _ in arms}
sync = torch.cuda.synchronize if cuda else (lambda: None)
times = {label: [] for label, *_ in arms}
for rep in range(repeats + 2):
    for label, _, slots, _ in arms:
        dar_minimal.SUM_SLOTS[args.device.split(":")[0]] = dar_minimal.DOT_SLOTS[args.device.split(":")[0]] = slots
        sync()
        t0 = time.perf_counter()
        steps[label]()
        sync()
        if rep >= 2:
            times[label].append(time.perf_counter() - t0)
rows = []
for label, _, _, ref in arms:
    med = statistics.median(times[label])
    rows.append(dict(arm=label, median_ms=1e3 * med, min_ms=1e3 * min(times[label]), max_ms=1e3 * max(times[label]),
                     time_ratio=med / statistics.median(times[ref]), reference=ref))
    print(f"| {label} | {rows[-1]['median_ms']:.1f} | {rows[-1]['min_ms']:.1f}-{rows[-1]['max_ms']:.1f} | "
          f"{rows[-1]['time_ratio']:.3f} |")
with open(f"{out}/mixing.json", "w") as f:
    json.dump(dict(machine=machine(), torch=torch.__version__, command=" ".join(["python"] + sys.argv),
                   config=dict(argv=size, repeats=repeats), rows=rows),
              f, indent=1)
