"""
rule.py: can a user tell from a residual DiT early in training whether DAR's gain will last? For every long run with
diagnostics of its residual arm at 2,000 steps (diagnostics.json, made by diagnose.sh from kept checkpoints; a
source named <run>_2k is <run>'s residual arm trained again to 2,000 steps, and serves every run compared with it): the
residual's gradient RMS from the first block to the last at t = 1 and its neighbouring blocks' cosine, beside DAR's
steps-to-match ratio at the run's last evaluation (summary.json; 8,000 steps where the run got there). Writes rule.md
and rule.png (the ratio against the gradient-RMS fall, a point per run, labelled by its name). A second rule
needs no checkpoint, only a short run of both arms: for every long run, DAR's ratio at 1,000 and 2,000 steps beside
whether its lead ended (summarize.lead_ends) and its last ratio (rule.md's second table, rule.png's right panel).

    python results/long/rule.py          # after summarize.py and diagnose.sh
"""
import json
import os

from summarize import lead_ends, source

HERE = os.path.dirname(os.path.abspath(__file__))


def running(run, summary):
    """True while the run's residual arm has not reached its planned steps (its points are drawn hollow)."""
    with open(os.path.join(HERE, source(run, "residual"), "residual", "config.json")) as f:
        return summary[run]["rows"][-1]["step"] < json.load(f)["args"]["steps"]


def label(ax, points):
    """Names the points (x, y, name); points that (nearly) coincide get one label with all their names."""
    at = {}
    for x, y, name in points:
        at.setdefault((round(x, 1), round(y, 2)), (x, y, []))[2].append(name)
    xs, ys = [x for x, _, _ in at.values()], [y for _, y, _ in at.values()]
    width, height = max(xs) - min(xs) or 1, max(ys) - min(ys) or 1
    placed = []
    for x, y, names in sorted(at.values()):
        near = any(abs(x - a) < 0.15 * width and abs(y - b) < 0.05 * height for a, b in placed)
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, -10 if near else 4), fontsize=7)
        placed.append((x, y))


def main():
    """Joins the residual diagnostics at 2,000 steps with the runs' last step ratios; writes rule.md and rule.png."""
    with open(os.path.join(HERE, "diagnostics.json")) as f:
        diagnostics = json.load(f)
    with open(os.path.join(HERE, "summary.json")) as f:
        summary = {s["run"]: s for s in json.load(f)}
    points = []
    for d in diagnostics:
        if d["arm"] != "residual" or d["step"] != 2000:
            continue
        trained = d["source"].split("/")[-1].removesuffix("_2k")          # <run>_2k: <run>'s residual arm trained again
        for run in (r for r in summary if source(r, "residual") == trained):   # every run this residual arm serves
            last = [r for r in summary[run]["rows"] if r["step_ratio"]][-1]
            points.append(dict(run=run, shape=f"{d['depth']} x {d['width']}", grad_fall=d["1.0"]["grad_first_over_last"],
                               cosine=d["1.0"]["mean_cosine"], ratio=last["step_ratio"], step=last["step"],
                               lasted=lead_ends(summary[run]["rows"]) is None, running=running(run, summary)))
    points.sort(key=lambda p: p["grad_fall"])
    lines = ["Written by results/long/rule.py. Residual arm at 2,000 steps, t = 1: gradient RMS of the first block over "
             "the last, mean cosine of neighbouring blocks; DAR: x fewer steps to the residual's loss at the run's last "
             "evaluation (above 1: still ahead).", "",
             "| run | blocks x width | residual grad first/last at 2,000 | residual cos at 2,000 | DAR x fewer steps (step) |",
             "|---|---|---|---|---|"]
    lines += [f"| `{p['run']}` | {p['shape']} | {p['grad_fall']:.2f} | {p['cosine']:.3f} | {p['ratio']:.2f} "
              f"({p['step']:,}{', running' if p['running'] else ''}) |" for p in points]
    early = []
    for s in summary.values():                          # the pilot rule: does DAR's ratio still grow from 1,000 to 2,000?
        at = {r["step"]: r["step_ratio"] for r in s["rows"] if r["exact"]}
        if 1000 in at and 2000 in at:
            last = [r for r in s["rows"] if r["step_ratio"]][-1]
            early.append(dict(run=s["run"], label=s["label"], r1000=at[1000], r2000=at[2000], ends=lead_ends(s["rows"]),
                              ratio=last["step_ratio"], step=last["step"],
                              running=running(s["run"], summary)))
    early.sort(key=lambda e: e["r2000"] / e["r1000"])
    lines += ["", "Every long run: DAR's x fewer steps at the residual's 1,000 and 2,000 steps, where its lead ended "
              "(summarize.py: the ratio first falls to 1 after 1,000 steps), its last ratio.", "",
              "| run | setting | x fewer at 1,000 | at 2,000 | 2,000 / 1,000 | the lead ends near step | last (step) |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| `{e['run']}` | {e['label']} | {e['r1000']:.2f} | {e['r2000']:.2f} | {e['r2000'] / e['r1000']:.2f} | "
              f"{'-' if e['ends'] is None else format(round(e['ends'], -2), ',.0f')} | {e['ratio']:.2f} ({e['step']:,}{', running' if e['running'] else ''}) |"
              for e in early]
    with open(os.path.join(HERE, "rule.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(HERE, "rule.json"), "w") as f:
        json.dump(dict(gradient=points, early=early), f, indent=1)
    print("\n".join(lines))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("rule.png not drawn: matplotlib is not installed")
        return
    fig = Figure(figsize=(11, 3.8))
    left, right = fig.subplots(1, 2)
    for p in points:
        color = "tab:blue" if p["lasted"] else "tab:red"
        left.scatter(p["grad_fall"], p["ratio"], edgecolors=color, facecolors="none" if p["running"] else color)
    label(left, [(p["grad_fall"], p["ratio"], p["run"]) for p in points])
    left.set(xlabel="residual at 2,000 steps: gradient RMS, first block / last (t = 1)",
             ylabel="DAR: x fewer steps at the last evaluation", title="runs whose 2,000-step checkpoints were kept")
    for e in early:
        color = "tab:red" if e["ends"] else "tab:blue"
        right.scatter(e["r2000"] / e["r1000"], e["ratio"], edgecolors=color, facecolors="none" if e["running"] else color)
    label(right, [(e["r2000"] / e["r1000"], e["ratio"], e["run"]) for e in early])
    right.axvline(1, color="gray", lw=0.5, ls="--")
    right.set(xlabel="DAR's x fewer steps at 2,000 / at 1,000", title="blue: the lead never ended; red: it ended; hollow: running")
    for ax in (left, right):
        ax.axhline(1, color="gray", lw=0.5, ls="--")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "rule.png"), dpi=110)


if __name__ == "__main__":
    main()
