"""
bench.py: step time and peak memory of DAR against the residual DiT, eager and torch.compile, at several depths.

    python results/bench.py --depths 4 8 12 --out results/cpu/bench            # tiny width, batch 64, CPU
    python results/bench.py --depths 12 --hidden-size 384 --num-heads 6 --patch-size 2 --batch-size 256 \
        --precision bf16 --modes compiled --out results/gpu/bench                # DiT-S/2 on one GPU

One training step = flow-matching loss, backward, AdamW step, on fixed random data. All arms are built in one
process and alternated within every round, so a slow spell of the machine hits them all; the first rounds are
warm-up (compilation) and are not timed. Reported per arm: median step time, min-max, the ratio of medians to the
residual arm of the same depth and mode, and the median of the per-round ratios (paired). Peak memory of each arm
is measured alone: on CUDA the allocator's peak over two steps; on the CPU the growth of a fresh child process's
peak resident memory over building the arm and two steps. Timings need an idle machine: the 1-minute load average
before and after, and the share of the CPU time other processes took during the timed rounds, go into the result;
when other processes took more than 10% (--max-busy), no result is written unless --allow-busy is given (the
table then says so).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dar_minimal import QUERIES, DiT, flow_matching_loss  # noqa: E402


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    a = p.add_argument
    a("--depths", type=int, nargs="+", default=[4, 8, 12])
    a("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    a("--dar", nargs="+", default=["static_t:4"], help="DAR arms as query:chunk, e.g. static_t:4 dynamic:4 static_t:1")
    a("--hidden-size", type=int, default=128)
    a("--num-heads", type=int, default=4)
    a("--patch-size", type=int, default=4)
    a("--image-size", type=int, default=32)
    a("--batch-size", type=int, default=64)
    a("--precision", default="fp32", choices=["fp32", "bf16"])
    a("--repeats", type=int, default=10, help="timed rounds (after two warm-up rounds)")
    a("--no-memory", action="store_true", help="time only")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--out", default="runs/bench")
    a("--max-busy", type=float, default=0.1, help="the most CPU share other processes may take while timing")
    a("--allow-busy", action="store_true", help="write the result even on a busy machine (marked as such)")
    args = p.parse_args(argv)
    for spec in args.dar:
        query, _, chunk = spec.partition(":")
        if query not in QUERIES or not chunk.isdigit() or int(chunk) < 1:
            p.error(f"--dar expects query:chunk with query one of {', '.join(QUERIES)} and chunk >= 1, got {spec!r}")
    return args


def arms(args):
    """(label, DiT keyword overrides, compiled) of every arm: residual, then each DAR variant, per depth and mode."""
    out = []
    for mode in args.modes:
        for depth in args.depths:
            out.append((f"d{depth} residual {mode}", dict(depth=depth, routing="residual"), mode == "compiled"))
            for spec in args.dar:
                query, chunk = spec.split(":")
                out.append((f"d{depth} dar {query} c{chunk} {mode}",
                            dict(depth=depth, routing="dar", dar_query=query, dar_chunk=int(chunk)), mode == "compiled"))
    return out


def setup(args, overrides, compiled):
    """A model, its optimiser and a one-step closure for one arm (fixed random data)."""
    torch.manual_seed(0)
    model = DiT(input_size=args.image_size, patch_size=args.patch_size, hidden_size=args.hidden_size,
                num_heads=args.num_heads, **overrides).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fn = torch.compile(model) if compiled else model
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, 10, (args.batch_size,), device=args.device)
    g = torch.Generator(args.device).manual_seed(0)

    def step():
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = flow_matching_loss(fn, x, y, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, step


def cpu_peak_child(args, overrides, compiled, queue):
    """In a child process, after one warm-up step of the same arm: growth of the peak resident memory (VmHWM, reset
    first) over building the arm and two steps."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    model, step = setup(args, overrides, compiled)
    step()                                        # torch's lazy initialisation (and compilation) before the window
    del model, step
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                              # reset the high-water mark to the current resident size
    base = status("VmRSS:")
    _, step = setup(args, overrides, compiled)
    step(), step()
    queue.put(status("VmHWM:") - base)


def peak_memory(args, overrides, compiled):
    """Peak memory of one arm, in bytes, measured alone."""
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model, step = setup(args, overrides, compiled)
        step(), step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del model, step
        return peak
    import multiprocessing as mp
    ctx = mp.get_context("spawn")                 # not fork: a fork after torch has started threads can hang
    queue = ctx.Queue()
    # glibc maps every block of 64 KiB or more on its own and unmaps it when freed, so the child's peak RSS follows
    # its live tensors rather than the free memory glibc keeps for reuse (read by the child's glibc at its start)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    child = ctx.Process(target=cpu_peak_child, args=(args, overrides, compiled, queue))
    child.start()
    del os.environ["MALLOC_MMAP_THRESHOLD_"]
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the memory child of {overrides} failed (exit code {child.exitcode})")
    return queue.get()


def cpu_seconds():
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its waited-for children), or None
    where /proc/stat does not exist."""
    if not os.path.exists("/proc/stat"):
        return None
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]        # user nice system idle iowait irq softirq steal
    t = os.times()
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def others_share(before, after, wall):
    """The share of the machine's CPU time that other processes took between two cpu_seconds() readings."""
    if before is None:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / (wall * os.cpu_count())


def machine():
    """A short description of the machine."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (torch {torch.__version__})"


def main(argv=None):
    """Times every arm in alternated rounds, measures each arm's peak memory alone; writes bench.json and bench.md."""
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    todo = arms(args)
    fmt = lambda v, f: "-" if v is None else format(v, f)
    print(f"bench on {machine()}: batch {args.batch_size}, {args.image_size} px, patch {args.patch_size}, "
          f"width {args.hidden_size}, {args.precision}, {len(todo)} arms, {args.repeats} timed rounds")
    load_before = os.getloadavg()[0]
    if load_before > 2 * args.max_busy * os.cpu_count() and not args.allow_busy:
        sys.exit(f"bench: the machine is busy (1-minute load average {load_before:.2f} on {os.cpu_count()} cores): "
                 "stop the other jobs and wait a minute, or give --allow-busy")
    memory = {}
    for label, o, c in todo:
        memory[label] = None if args.no_memory else peak_memory(args, o, c)
        print(f"{label}: peak memory {fmt(memory[label] and memory[label] / 2 ** 20, '.0f')} MB", flush=True)
    steps = {label: setup(args, o, c)[1] for label, o, c in todo}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {label: [] for label in steps}
    for rnd in range(args.repeats + 2):                                # two warm-up rounds (and compilation)
        if rnd == 2:
            cpu0, wall0 = cpu_seconds(), time.perf_counter()
        for label, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if rnd >= 2:
                times[label].append(time.perf_counter() - t0)
    busy = others_share(cpu0, cpu_seconds(), time.perf_counter() - wall0)
    load = dict(load_average_before=load_before, load_average_after=os.getloadavg()[0], others_cpu_share=busy,
                busy=busy is not None and busy > args.max_busy)
    rows = []
    for label, o, c in todo:
        ref = f"d{o['depth']} residual {'compiled' if c else 'eager'}"
        med, ref_med = statistics.median(times[label]), statistics.median(times[ref])
        mb = memory[label] / 2 ** 20 if memory[label] is not None else None
        ref_mb = memory[ref] / 2 ** 20 if memory[ref] is not None else None
        rows.append(dict(arm=label, median_ms=1e3 * med, min_ms=1e3 * min(times[label]),
                         max_ms=1e3 * max(times[label]), time_ratio=med / ref_med,
                         paired_ratio=statistics.median(a / b for a, b in zip(times[label], times[ref])),
                         peak_memory_mb=mb, memory_ratio=mb / ref_mb if mb and ref_mb else None, reference=ref))
    table = "\n".join(["| arm | step ms (median) | min-max | x residual | x residual, paired | peak MB | x residual |",
                       "|---|---|---|---|---|---|---|"] +
                      [f"| {r['arm']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | "
                       f"{r['time_ratio']:.3f} | {r['paired_ratio']:.3f} | {fmt(r['peak_memory_mb'], '.0f')} | "
                       f"{fmt(r['memory_ratio'], '.3f')} |" for r in rows])
    said = (f"load: 1-minute load average {load['load_average_before']:.2f} before, "
            f"{load['load_average_after']:.2f} after (with this benchmark's own); other processes took "
            + (f"{100 * busy:.1f}% of the CPU time while timing" if busy is not None else "an unknown share (no /proc/stat)"))
    if load["busy"]:
        said = f"**Measured on a busy machine (--allow-busy): the times are too high.** {said}"
        table = table.replace("step ms (median)", "step ms (median, BUSY machine)")
    print(table + "\n" + said)
    if load["busy"] and not args.allow_busy:
        sys.exit(f"bench: not written, the machine was busy: other processes took {100 * busy:.0f}% of the CPU time "
                 f"(more than --max-busy {args.max_busy}); stop them and run again, or give --allow-busy")
    command = " ".join(["python", "results/bench.py"] + (sys.argv[1:] if argv is None else list(argv)))
    result = dict(machine=machine(), torch=torch.__version__, command=command, config=vars(args), load=load, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(f"{result['machine']}\n\n`{command}`\n\n{said}\n\n{table}\n")
    return result


if __name__ == "__main__":
    main()
