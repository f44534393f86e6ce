"""
memory.py: does training on a latents directory of several GB keep its memory bounded? (issue 31)

Writes two latents directories of random numbers in the format of tools/encode_latents.py (ImageNet 256's shape,
4 x 32 x 32 float16, 8 KB a row; the format is tested, not the content): a small one and one of --gigabytes. Trains
the same residual model (tiny preset, patch 4) for --steps steps on each, one thread, in a child process, and reads
the child's memory from /proc every 0.2 s: VmRSS (resident), RssAnon (its own memory: tensors, model, optimiser),
RssFile (file pages mapped into it: the latents rows it has touched, the loaded libraries' code). The difference
between the two runs is what the big file costs. Needs Linux and the disk space (the directories are deleted after).

    python results/latents/memory.py --gigabytes 4 --steps 300 --out results/latents     # ~15 min on one core
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (4, 32, 32)                                               # SD-VAE latents of 256 x 256 images


def make_latents(path, n, seed=0):
    """A latents directory of n random rows (float16, SHAPE) with labels 0..999 and a latents.json."""
    os.makedirs(path)
    rows = np.lib.format.open_memmap(os.path.join(path, "latents.npy"), mode="w+", dtype=np.float16, shape=(n, *SHAPE))
    rng = np.random.default_rng(seed)
    for i in range(0, n, 16384):
        rows[i:i + 16384] = rng.standard_normal((min(16384, n - i), *SHAPE), dtype=np.float32)
    rows.flush()
    del rows
    np.save(os.path.join(path, "labels.npy"), np.arange(n, dtype=np.int64) % 1000)
    with open(os.path.join(path, "latents.json"), "w") as f:
        json.dump(dict(autoencoder="none (random numbers)", count=n, done=n, classes=[str(c) for c in range(1000)]), f)
    return os.path.getsize(os.path.join(path, "latents.npy"))


def status(pid):
    """The memory lines of /proc/<pid>/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def train(path, out, steps):
    """Trains on the latents directory in a child process; returns its memory samples and peaks."""
    cmd = [sys.executable, os.path.join(ROOT, "train_cifar.py"), "--dataset", "latents", "--data-path", path,
           "--preset", "tiny", "--patch-size", "4", "--routing", "residual", "--steps", str(steps), "--eval-every",
           str(steps), "--val-size", "500", "--vae", "none", "--device", "cpu", "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0, samples = time.time(), []
    with tempfile.TemporaryFile("w+") as err:                       # (a pipe would fill up with progress bars)
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        while child.poll() is None:
            try:
                memory = status(child.pid)
                if "VmRSS" in memory:                             # (not when it has just ended)
                    samples.append(dict(seconds=round(time.time() - t0, 1), **memory))
            except (FileNotFoundError, ProcessLookupError):
                pass
            time.sleep(0.2)
        if child.returncode:
            err.seek(0)
            sys.exit(f"training failed: {err.read()[-2000:]}")
    peak = {k: max(s[k] for s in samples) for k in ("VmRSS", "RssAnon", "RssFile")}
    return dict(command=" ".join(cmd[1:]), seconds=round(time.time() - t0), peak=peak, samples=samples[::10])


def main(argv=None):
    """Both runs; writes memory.json and memory.md into --out."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("--gigabytes", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the directories are written (and deleted)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "latents"))
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(dir=args.tmp)
    rows = {"small": 20_000, "big": int(args.gigabytes * 2 ** 30 / (2 * np.prod(SHAPE)))}
    runs = {}
    try:
        for name, n in rows.items():
            size = make_latents(os.path.join(work, name), n)
            print(f"{name}: {n} rows, {size / 2 ** 30:.2f} GiB; training {args.steps} steps", flush=True)
            runs[name] = dict(rows=n, file_bytes=size, **train(os.path.join(work, name), os.path.join(work, "run_" + name),
                                                              args.steps))
            print(f"  peak resident {runs[name]['peak']['VmRSS'] / 2 ** 20:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(work)
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal"))
    result = dict(runs=runs, steps=args.steps, machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                  f"{total / 2 ** 30:.0f} GiB", command="python results/latents/memory.py " + " ".join(argv or sys.argv[1:]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump(result, f, indent=1)
    mib = lambda b: f"{b / 2 ** 20:,.0f}"                             # noqa: E731
    lines = [f"Training {args.steps} steps (tiny preset, patch 4, batch 64, residual, one thread) on a latents directory "
             f"of random numbers, 4 x 32 x 32 float16 rows; {result['machine']}.", "",
             "| latents.npy | rows | peak resident (MiB) | of it: own memory (RssAnon) | file pages (RssFile) |",
             "|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {r['file_bytes'] / 2 ** 30:.2f} GiB | {r['rows']:,} | {mib(r['peak']['VmRSS'])} | "
                     f"{mib(r['peak']['RssAnon'])} | {mib(r['peak']['RssFile'])} |")
    big, small = runs["big"], runs["small"]
    lines += ["", f"The {big['file_bytes'] / 2 ** 30:.1f} GiB file costs {mib(big['peak']['VmRSS'] - small['peak']['VmRSS'])} "
              f"MiB more resident memory than the {small['file_bytes'] / 2 ** 20:.0f} MiB one "
              f"({100 * (big['peak']['VmRSS'] - small['peak']['VmRSS']) / big['file_bytes']:.1f}% of its size)."]
    with open(os.path.join(args.out, "memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
