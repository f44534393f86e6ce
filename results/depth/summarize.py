"""Summary of the depth sweep (results/depth/run.sh): per depth, over seeds, DAR's step and wall-clock advantage.

    python results/depth/summarize.py        writes results/depth/summary.json, summary.md and (matplotlib) depth.png

For each run (depth, seed): the residual arm's final validation loss is the target; DAR's steps to reach it are
interpolated linearly between evaluations (as compare.json does), and so is DAR's training time to reach it; the
wall-clock-matched comparison reads DAR's validation loss at the residual arm's total training time.
"""
import glob
import json
import os
import re
import statistics

R = "results/depth"


def reach(xs, losses, target):
    """First x at which the piecewise-linear curve (xs, losses) is <= target, or None."""
    for k, (x, v) in enumerate(zip(xs, losses)):
        if v <= target:
            if k == 0:
                return x
            return xs[k - 1] + (losses[k - 1] - target) / (losses[k - 1] - v) * (x - xs[k - 1])
    return None


def at(xs, losses, x):
    """The piecewise-linear curve (xs, losses) at x (None outside the evaluated range)."""
    for k in range(1, len(xs)):
        if xs[k - 1] <= x <= xs[k]:
            return losses[k - 1] + (x - xs[k - 1]) / (xs[k] - xs[k - 1]) * (losses[k] - losses[k - 1])
    return None


runs = []
for path in sorted(glob.glob(f"{R}/d*_s*/compare.json")):
    depth, seed = map(int, re.search(r"d(\d+)_s(\d+)", path).groups())
    c = json.load(open(path))
    res, dar = c["arms"]["residual"], c["arms"]["dar"]
    target, t_res = res["final_val_loss"], res["train_seconds"]
    steps_dar = reach(dar["steps"], dar["val_loss"], target)
    time_dar = reach(dar["train_seconds_at_eval"], dar["val_loss"], target)
    runs.append(dict(depth=depth, seed=seed, steps=res["steps"][-1], residual_val=res["val_loss"],
                     dar_val=dar["val_loss"], eval_steps=res["steps"],
                     residual_train_seconds=t_res, dar_train_seconds=dar["train_seconds"],
                     step_time_ratio=dar["train_seconds"] / t_res,
                     speedup_in_steps=res["steps"][-1] / steps_dar if steps_dar else None,
                     speedup_in_wall_clock=t_res / time_dar if time_dar else None,
                     dar_val_at_residual_time=at(dar["train_seconds_at_eval"], dar["val_loss"], t_res),
                     residual_final_val=target))

summary = []
for depth in sorted({r["depth"] for r in runs}):
    rs = [r for r in runs if r["depth"] == depth]
    row = dict(depth=depth, seeds=[r["seed"] for r in rs])
    for key in ("speedup_in_steps", "speedup_in_wall_clock", "step_time_ratio", "residual_final_val",
                "dar_val_at_residual_time", "residual_train_seconds", "dar_train_seconds"):
        vals = [r[key] for r in rs]
        row[key] = vals
        row[key + "_mean"] = statistics.mean(vals) if None not in vals else None
    row["final_val_gap_per_seed"] = [r["residual_val"][-1] - r["dar_val"][-1] for r in rs]   # > 0: DAR lower
    row["residual_seed_spread"] = max(r["residual_val"][-1] for r in rs) - min(r["residual_val"][-1] for r in rs)
    summary.append(row)
json.dump(dict(runs=runs, by_depth=summary), open(f"{R}/summary.json", "w"), indent=1)

fmt = lambda v, f=".2f": "-" if v is None else format(v, f)
lines = ["| blocks | seeds | DAR: x fewer steps (per seed) | mean | final val: residual / DAR (per seed) | "
         "seed spread of residual | step time DAR / residual | DAR val at residual's wall-clock | "
         "x less wall-clock |", "|---|---|---|---|---|---|---|---|---|"]
for row in summary:
    rs = [r for r in runs if r["depth"] == row["depth"]]
    lines.append(f"| {row['depth']} | {len(rs)} | {', '.join(fmt(v) for v in row['speedup_in_steps'])} | "
                 f"{fmt(row['speedup_in_steps_mean'])} | "
                 + ", ".join(f"{r['residual_val'][-1]:.4f} / {r['dar_val'][-1]:.4f}" for r in rs)
                 + f" | {row['residual_seed_spread']:.4f} | "
                 + ", ".join(fmt(v) for v in row["step_time_ratio"]) + " | "
                 + ", ".join(fmt(v, ".4f") for v in row["dar_val_at_residual_time"]) + " | "
                 + ", ".join(fmt(v) for v in row["speedup_in_wall_clock"]) + " |")
table = "\n".join(lines)
print(table)
with open(f"{R}/summary.md", "w") as f:
    f.write(table + "\n")

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    raise SystemExit("matplotlib is not installed: depth.png not written (summary.json has the numbers)")
depths = [row["depth"] for row in summary]
fig, axes = plt.subplots(1, 2 + len(depths), figsize=(4.2 * (2 + len(depths)), 3.6))
ax = axes[0]
for row in summary:
    ax.scatter([row["depth"]] * len(row["seeds"]), [v or float("nan") for v in row["speedup_in_steps"]], color="C1", alpha=0.6)
ax.plot(depths, [row["speedup_in_steps_mean"] for row in summary], "o-", color="C1", label="steps (mean)")
for row in summary:
    ax.scatter([row["depth"]] * len(row["seeds"]), [v or float("nan") for v in row["speedup_in_wall_clock"]], color="C2",
               alpha=0.6, marker="s")
ax.plot(depths, [row["speedup_in_wall_clock_mean"] for row in summary], "s-", color="C2", label="wall-clock (mean)")
ax.axhline(1, color="gray", lw=0.5)
ax.set(xlabel="blocks", ylabel="DAR: x fewer (to residual's final val loss)", xticks=depths)
ax.legend()
ax = axes[1]
for row in summary:
    rs = [r for r in runs if r["depth"] == row["depth"]]
    ax.scatter([row["depth"]] * len(rs), [r["residual_final_val"] for r in rs], color="C0", alpha=0.6)
    ax.scatter([row["depth"]] * len(rs), [r["dar_val_at_residual_time"] or float("nan") for r in rs], color="C1",
               alpha=0.6)
ax.plot(depths, [row["residual_final_val_mean"] for row in summary], "o-", color="C0", label="residual, final")
ax.plot(depths, [row["dar_val_at_residual_time_mean"] for row in summary], "o-", color="C1",
        label="DAR, at residual's time")
ax.set(xlabel="blocks", ylabel="validation loss (EMA)", xticks=depths, title="equal wall-clock")
ax.legend()
for ax, depth in zip(axes[2:], depths):
    for r in [r for r in runs if r["depth"] == depth]:
        ls = "-" if r["seed"] == 0 else "--"
        ax.plot(r["eval_steps"], r["residual_val"], ls, color="C0", label=f"residual s{r['seed']}")
        ax.plot(r["eval_steps"], r["dar_val"], ls, color="C1", label=f"DAR s{r['seed']}")
    ax.set(xlabel="step", title=f"{depth} blocks", ylabel="validation loss (EMA)")
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(f"{R}/depth.png", dpi=110)
print(f"wrote {R}/summary.json, summary.md, depth.png")

# Diagnostics of the seed-0 checkpoints by depth (results/depth/diagnose.sh), at the paper's t = 1.0 and at t = 0.5
diag = {int(re.search(r"_d(\d+)", p).group(1)): json.load(open(p))
        for p in glob.glob(f"{R}/diagnostics_d*/diagnostics.json")}
if diag:
    ts = ("1.0", "0.5")
    rows = {t: {} for t in ts}
    for t in ts:
        for depth, d in sorted(diag.items()):
            for arm in ("residual", "dar"):
                f = d[arm]["flow"][t]
                rows[t][f"{arm} d{depth}"] = dict(
                    rms_last_over_first=f["forward_rms"][-1] / f["forward_rms"][0],
                    grad_first_over_last=f["gradient_rms"][0] / f["gradient_rms"][-1],
                    mean_cosine=statistics.mean(f["cosine"]))
                print(f"t={t}", arm, depth, {k: round(v, 3) for k, v in rows[t][f"{arm} d{depth}"].items()})
    json.dump(rows, open(f"{R}/diagnostics_by_depth.json", "w"), indent=1)
    fig, axes = plt.subplots(len(ts), 3, figsize=(13, 3.4 * len(ts)))
    for t, row_axes in zip(ts, axes):
        for depth, d in sorted(diag.items()):
            for arm, color in (("residual", "C0"), ("dar", "C1")):
                f = d[arm]["flow"][t]
                for ax, key in zip(row_axes, ("forward_rms", "gradient_rms", "cosine")):
                    xs = [(k + 1) / len(f[key]) for k in range(len(f[key]))]
                    ax.plot(xs, f[key], color=color, alpha=0.35 + 0.65 * depth / max(diag), marker=".",
                            label=f"{arm}, {depth} blocks")
        for ax, title in zip(row_axes, ("forward RMS of z_k", "gradient RMS at z_k", "cosine(z_k, z_k+1)")):
            ax.set(xlabel="relative depth k / blocks", title=f"{title}, t = {t}")
        row_axes[1].set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{R}/diagnostics_by_depth.png", dpi=100)
    print(f"wrote {R}/diagnostics_by_depth.json, diagnostics_by_depth.png")
