"""
profile_step.py: where DAR's extra step time goes (torch.profiler, compiled), and how far it is from the cost of only
reading the sources.

    python results/profile_step.py --out results/cpu/profile           # 8 blocks, tiny width, batch 64, the CPU

The residual and DAR (static+t, chunk 4) models are compiled, warmed up, then timed in alternated rounds (median
step time, as results/bench.py) and profiled for a few steps each, with inductor's C++ kernels named in the profile.
Self time is grouped by kind of work: matrix products, attention, inductor's fused C++ kernels (norms, activations,
modulation, DAR's scores, softmax and weighted sums), the optimiser, the rest. The floor: each reader l reads its
|S_l| sources of B x N x d floats to form h_l and the backward reads them again, so DAR must move at least
2 * sum_l |S_l| * B * N * d * 4 bytes; at the read bandwidth measured here (sums over as many tensors of that shape,
as in the step) that takes the floor's time. The machine's load is recorded as in bench.py.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch._inductor.config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import cpu_seconds, machine, others_share  # noqa: E402
from dar_minimal import DiT, flow_matching_loss  # noqa: E402

KINDS = [("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear")),
         ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
         ("fused C++ kernels (inductor)", ("cpp_fused",)),
         ("optimiser (AdamW)", ("_foreach", "aten::_fused_adamw", "Optimizer.step")),
         ("the rest", ("",))]


def kind(name):
    """The kind of work an op or kernel name belongs to (the first of KINDS whose pattern it contains)."""
    return next(k for k, patterns in KINDS if any(p in name for p in patterns))


def setup(args, routing):
    """A compiled model of one arm, its optimiser and a one-step closure on fixed random data."""
    torch.manual_seed(0)
    model = DiT(input_size=32, patch_size=args.patch_size, hidden_size=args.hidden_size, depth=args.depth,
                num_heads=args.num_heads, routing=routing, dar_query="static_t", dar_chunk=args.chunk)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fn = torch.compile(model)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    g = torch.Generator().manual_seed(0)

    def step():
        loss = flow_matching_loss(fn, x, y, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, step


def read_floor(args, model):
    """(bytes DAR's readers must read per step, forward and backward; seconds that takes at the measured bandwidth)."""
    N, d = (32 // args.patch_size) ** 2, args.hidden_size
    reads = sum(len(s) for s in model.router.sources)                      # sum_l |S_l|, readers 1 .. L+1
    nbytes = 2 * reads * args.batch_size * N * d * 4
    v = [torch.randn(args.batch_size, N, d) for _ in range(model.router.num_sublayers + 1)]   # v_0 .. v_L
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for src in model.router.sources:
            for i in src:
                v[i].sum()
        times.append(time.perf_counter() - t0)
    per_pass = statistics.median(times[2:])                                # one forward's reads
    return nbytes, 2 * per_pass, reads * args.batch_size * N * d * 4 / per_pass


def main(argv=None):
    """Times and profiles both arms; writes profile.json and profile.md."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    a = p.add_argument
    a("--depth", type=int, default=8)
    a("--hidden-size", type=int, default=128)
    a("--num-heads", type=int, default=4)
    a("--patch-size", type=int, default=4)
    a("--batch-size", type=int, default=64)
    a("--chunk", type=int, default=4)
    a("--repeats", type=int, default=10, help="timed rounds")
    a("--profile-steps", type=int, default=5)
    a("--out", default="runs/profile")
    args = p.parse_args(argv)
    torch._inductor.config.cpp.enable_kernel_profile = True               # name each C++ kernel in the profile
    load_before = os.getloadavg()[0]
    arms = {r: setup(args, r) for r in ("residual", "dar")}
    for _, step in arms.values():
        step(), step(), step()                                             # compilation and warm-up
    times = {r: [] for r in arms}
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for _ in range(args.repeats):
        for r, (_, step) in arms.items():
            t0 = time.perf_counter()
            step()
            times[r].append(time.perf_counter() - t0)
    busy = others_share(cpu0, cpu_seconds(), time.perf_counter() - wall0)
    median = {r: 1e3 * statistics.median(v) for r, v in times.items()}
    by_kind, top = {}, {}
    for r, (_, step) in arms.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                step()
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        by_kind[r] = {k: 0.0 for k, _ in KINDS}
        for e in events:
            by_kind[r][kind(e.key)] += e.self_cpu_time_total / 1e3 / args.profile_steps       # ms per step
        top[r] = [(e.key, e.self_cpu_time_total / 1e3 / args.profile_steps)
                  for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]]
    nbytes, floor_s, bandwidth = read_floor(args, arms["dar"][0])
    extra = median["dar"] - median["residual"]
    result = dict(machine=machine(), command=" ".join(["python", "results/profile_step.py"] + (argv or sys.argv[1:])),
                  config=vars(args), load=dict(load_average_before=load_before, load_average_after=os.getloadavg()[0],
                                               others_cpu_share=busy),
                  step_ms=median, dar_extra_ms=extra, ms_per_step_by_kind=by_kind, top_ops=top,
                  read_floor=dict(bytes=nbytes, ms=1e3 * floor_s, bandwidth_gb_s=bandwidth / 1e9,
                                  share_of_extra=1e3 * floor_s / extra if extra > 0 else None))
    rows = [f"| {k} | {by_kind['residual'][k]:.1f} | {by_kind['dar'][k]:.1f} | "
            f"{by_kind['dar'][k] - by_kind['residual'][k]:+.1f} |" for k, _ in KINDS]
    md = "\n".join([
        result["machine"], "", f"`{result['command']}`", "",
        f"load: 1-minute load average {load_before:.2f} before, {result['load']['load_average_after']:.2f} after; "
        f"other processes took {100 * busy:.1f}% of the CPU time while timing" if busy is not None else "load: unknown",
        "", f"Step time (median of {args.repeats}, alternated): residual {median['residual']:.1f} ms, DAR "
        f"{median['dar']:.1f} ms ({median['dar'] / median['residual']:.2f}x); DAR's extra: {extra:.1f} ms.", "",
        "| profiled self time, ms per step | residual | DAR | DAR - residual |", "|---|---|---|---|", *rows, "",
        f"Reading the sources only: 2 x {nbytes / 2 ** 21:.0f} MiB per step (forward and backward) at "
        f"{bandwidth / 1e9:.1f} GB/s = {1e3 * floor_s:.1f} ms, "
        + (f"{100 * result['read_floor']['share_of_extra']:.0f}% of DAR's extra time." if extra > 0 else "."), "",
        "DAR's largest ops and kernels (self time, ms per step):", "",
        *[f"- `{name[:90]}` {ms:.2f}" for name, ms in top["dar"]], ""])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
