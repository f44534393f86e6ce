"""
rows.py: how fast train_cifar.py reads the rows of a latents directory (tools/data.py FileRows, one positional read
per row, in file order), from a file not in the page cache (evicted with posix_fadvise) and from one that is: batches
of 256 random rows of ImageNet-256's latent shape (4 x 32 x 32 float16, 8 KB), as training draws them. Training reads
the next step's rows in a background thread (tools/data.py Prefetch), so a step waits only when reading a batch takes
longer than the step. Writes rows.json and rows.md into --out; needs an idle machine.

    python results/latents/rows.py --out results/latents
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tools.data import FileRows  # noqa: E402


def evict(path):
    """Drops the file's pages from the page cache (clean pages; no privileges needed)."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def timed_batches(rows, batches, batch, seed):
    """Seconds per batch of `batch` random rows, for `batches` batches."""
    g, seconds = torch.Generator().manual_seed(seed), []
    for _ in range(batches):
        idx = torch.randperm(len(rows), generator=g)[:batch]
        t0 = time.perf_counter()
        rows[idx]
        seconds.append(time.perf_counter() - t0)
    return seconds


def main():
    """Writes the file, times cold and warm reads, writes the result."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="rows in the file (8 KB each: 100,000 is 0.8 GB)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--dir", help="where to write the file (default: a temporary directory, deleted after)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    d = args.dir or tempfile.mkdtemp()
    path = os.path.join(d, "latents.npy")
    z = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(args.rows, 4, 32, 32))
    for i in range(0, args.rows, 10_000):
        z[i:i + 10_000] = np.random.default_rng(i).standard_normal((min(10_000, args.rows - i), 4, 32, 32))
    z.flush()
    del z
    rows = FileRows(path, torch.arange(args.rows))
    load = os.getloadavg()[0]
    result = dict(machine=f"{platform.machine()}, {os.cpu_count()} CPU cores", rows=args.rows, batch=args.batch,
                  batches=args.batches, row_bytes=rows.row_bytes, load_before=load, runs={})
    for name in ("cold", "warm", "cold", "warm"):                   # each twice, alternated
        evict(path)
        if name == "warm":
            with open(path, "rb") as f:                              # the whole file into the page cache
                while f.read(1 << 24):
                    pass
        seconds = timed_batches(rows, args.batches, args.batch, seed=len(result["runs"]))
        result["runs"][f"{name}_{len(result['runs'])}"] = seconds
    result["load_after"] = os.getloadavg()[0]
    table = ["| file | ms per batch of %d (median, min-max) | rows per second |" % args.batch, "|---|---|---|"]
    for name in ("cold", "warm"):
        s = sorted(x for k, v in result["runs"].items() if k.startswith(name) for x in v)
        med = statistics.median(s)
        result[name] = dict(median_ms=1000 * med, min_ms=1000 * s[0], max_ms=1000 * s[-1], rows_per_s=args.batch / med)
        table.append(f"| {name} ({'evicted from' if name == 'cold' else 'in'} the page cache) | {1000 * med:.1f} "
                     f"({1000 * s[0]:.1f}-{1000 * s[-1]:.1f}) | {args.batch / med:,.0f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "rows.md"), "w") as f:
        f.write(f"Reading latents rows (`python results/latents/rows.py`), {result['machine']}, {args.rows:,} rows of "
                f"{rows.row_bytes:,} bytes, {args.batches} x 2 batches per case, load average {load:.2f} before and "
                f"{result['load_after']:.2f} after.\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))
    if not args.dir:
        os.remove(path)
        os.rmdir(d)


if __name__ == "__main__":
    main()
