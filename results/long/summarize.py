"""
summarize.py: does DAR's lead last? Reads the long runs' logs (results/long/<run>/<arm>/log.jsonl) and writes
summary.json, summary.md, readme_table.md (the README's table) and ratio.png next to them.

For every evaluation step N of the residual arm: how many steps DAR needed to reach the residual arm's validation
loss at N (linear interpolation between DAR's evaluations; '>' when DAR was already below it at its first
evaluation, None when it never got there), the ratio N / those steps (above 1: DAR ahead; where DAR never got there,
the residual's step with DAR's loss at N, over N), and the same in training time. Training times exclude evaluation, and the pauses recorded in pauses.jsonl (when the runs were stopped so that
a benchmark could time a quiet machine). After the other arm had finished, an arm ran on other terms (restarts.jsonl:
continued with more threads so that the run ends within a session, or sharing the cores with the next run): it has
no comparable training time after that step, and from there its time ratios are left out. A DAR-only run compared
with another run's residual arm (<run>/residual_from) has no time ratios at all: its arms did not train side by side.
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_CORES = {"d8_s0_te", "w64_d24_s0", "w64_d24_s1", "w64_d8_s0", "w64_d16_s0"}   # trained beside other work at
#                                     times (tests, scoring, checks): their training-time ratios are indicative only


def source(run, arm):
    """The run whose log holds this arm: the run itself, or the run that <run>/<arm>_from names (a DAR-only run
    compared with an earlier run's residual arm)."""
    path = os.path.join(HERE, run, f"{arm}_from")
    return open(path).read().strip() if os.path.exists(path) else run


def evals(run, arm, pauses):
    """The eval records of one arm, train_seconds without the recorded pauses before each."""
    run = source(run, arm)
    with open(os.path.join(HERE, run, arm, "log.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    ev = [r for r in records if r["kind"] == "eval"]
    gaps = sorted(b["train_seconds"] - a["train_seconds"] for a, b in zip(ev, ev[1:]))
    typical = gaps[len(gaps) // 2] if gaps else 0
    in_training = []                   # a pause counts only if it fell into training, not into an evaluation:
    for p in (p for p in pauses if p["run"] == run):   # then the gap between the evaluations around it holds it
        last = p["last_logged_step"][arm]
        if last is None:                                        # the arm had not started yet
            continue
        around = [(a, b) for a, b in zip(ev, ev[1:]) if a["step"] <= last < b["step"]]
        if around and around[0][1]["train_seconds"] - around[0][0]["train_seconds"] - p["seconds"] > typical / 2:
            in_training.append(p)
    return [dict(r, train_seconds=r["train_seconds"] - sum(p["seconds"] for p in in_training
                                                            if p["last_logged_step"][arm] < r["step"])) for r in ev]


def reach(curve, target, key):
    """First x (steps or seconds, by key) at which the curve's val loss reaches target, interpolated; (x, exact)."""
    prev = None
    for r in curve:
        if r["val_loss"] <= target:
            if prev is None:
                return r[key], False                          # already below at the first evaluation: an upper bound
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - r["val_loss"])
            return prev[key] + frac * (r[key] - prev[key]), True
        prev = r
    return None, True


def summarize(run, pauses, restarts):
    """Per evaluation of the residual arm: both losses, DAR's steps and seconds to the residual's loss, ratios."""
    res, dar = evals(run, "residual", pauses), evals(run, "dar", pauses)
    timed = lambda arm, ev: [r for r in ev if all(r["step"] <= x["step"] for x in restarts
                                                  if x["run"] == run and x["arm"] == arm)]
    res_timed, dar_timed = timed("residual", res), timed("dar", dar)
    if source(run, "residual") != run:                  # the arms trained at other times, on other loads: no timing
        res_timed = []
    rows = []
    for r in res:
        steps, exact = reach(dar, r["val_loss"], "step")
        secs = reach(dar_timed, r["val_loss"], "train_seconds")[0] if r in res_timed else None
        d = next((x for x in dar if x["step"] == r["step"]), None)
        ratio = r["step"] / steps if steps else None
        if steps is None and d is not None:         # DAR never got there: the residual step with DAR's loss at N, / N
            ratio = reach(res, d["val_loss"], "step")[0] / r["step"]
        rows.append(dict(step=r["step"], residual=r["val_loss"], dar=d and d["val_loss"], dar_steps=steps,
                         exact=exact, step_ratio=ratio,
                         time_ratio=r["train_seconds"] / secs if secs else None,
                         per_t_gap=d and [a - b for a, b in zip(r["val_loss_per_t"], d["val_loss_per_t"])]))
    with open(os.path.join(HERE, run, "dar", "config.json")) as f:
        args = json.load(f)["args"]
    cosine = args.get("lr_schedule", "constant") == "cosine"           # runs from before the option: constant
    setting = f"{args['depth']} blocks" + (f", width {args['hidden_size']}" if args["hidden_size"] != 128 else "") \
        + (f", {args['dar_query']}" if args["dar_query"] != "static_t" else "") \
        + (f", chunk {args['dar_chunk']}" if args["dar_chunk"] != 4 else "") \
        + (f", warm-up {args['warmup']} + cosine" if cosine else "")      # what differs from the first long runs
    return dict(run=run, depth=args["depth"], seed=args["seed"], schedule="cosine" if cosine else "constant",
                setting=setting, label=f"{setting}, seed {args['seed']}", rows=rows, samples=sample_quality(run))


def sample_quality(run):
    """Per step at which both arms' kept checkpoints were scored (results/long/<run>/scores*.json, written by
    score.sh; an arm from another run: that run's scores): the Frechet distance and sample accuracy of each arm,
    means over draws."""
    got = {}
    for arm in ("residual", "dar"):
        folder = os.path.join(HERE, source(run, arm))
        for name in sorted(os.listdir(folder)):
            if name.startswith("scores") and name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    for r in json.load(f)["rows"]:
                        if r["routing"] == arm:
                            got.setdefault((r["step"], arm), []).append(r)
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    return [dict(step=step, **{f"{arm}_{k}": mean(got[step, arm], k) for arm in ("residual", "dar")
                               for k in ("fid", "sample_accuracy")})
            for step in sorted({s for s, _ in got}) if (step, "residual") in got and (step, "dar") in got]


def across_seeds(summary, fmt):
    """Per setting (depth, width, query, chunk, schedule) with more than one seed: at each N that every seed evaluated,
    the step ratios per seed, their mean and spread (max - min), and the gap (DAR - residual val loss) per seed."""
    lines = []
    for setting in sorted({s["setting"] for s in summary}):
        runs = [s for s in summary if s["setting"] == setting]
        if len(runs) < 2:
            continue
        by_step = [{r["step"]: r for r in s["rows"] if r["dar"] is not None} for s in runs]
        shared = sorted(set.intersection(*(set(b) for b in by_step)))
        lines += [f"## {setting}, seeds "
                  f"{', '.join(str(s['seed']) for s in runs)}: the seed spread", "",
                  "| residual step N | x fewer steps, per seed | mean | spread (max - min) | DAR - residual val loss, "
                  "per seed |", "|---|---|---|---|---|"]
        for n in shared:
            ratios = [b[n]["step_ratio"] for b in by_step]
            exact = all(b[n]["exact"] for b in by_step)
            ok = [x for x in ratios if x is not None]
            mean = sum(ok) / len(ok) if len(ok) == len(ratios) else None
            lines.append(f"| {n} | {', '.join(('' if exact else '>=') + fmt(x, '.2f') for x in ratios)} | "
                         f"{fmt(mean if exact else None, '.2f')} | {fmt(max(ok) - min(ok) if exact and mean else None, '.2f')} | "
                         f"{', '.join(format(b[n]['dar'] - b[n]['residual'], '+.4f') for b in by_step)} |")
        lines.append("")
    return lines


def lead_ends(rows):
    """The residual step N at which DAR's step ratio first falls to 1 after 1,000 steps (interpolated), or None."""
    pts = [(r["step"], r["step_ratio"]) for r in rows if r["step"] >= 1000 and r["step_ratio"] and r["exact"]]
    for (n0, r0), (n1, r1) in zip(pts, pts[1:]):
        if r0 > 1 >= r1:
            return n0 + (r0 - 1) / (r0 - r1) * (n1 - n0)
    return None


def readme_table(summary, fmt):
    """The README's table, one row per run: the step ratio at 1,000, 2,000, 4,000 steps and at the last evaluation
    both arms reached, where the lead ends, the final val-loss gap (DAR - residual) and the last time ratio; runs by
    schedule (constant first), depth, setting, seed. summary.md has every evaluation."""
    runs = sorted(summary, key=lambda s: (s["schedule"], s["depth"], s["setting"], s["seed"]))
    lines = ["| run | DAR x fewer steps at residual step 1,000 / 2,000 / 4,000 / last | the lead ends near step | "
             "DAR - residual val loss, last | DAR x less training time, last (~: cores shared, indicative) | samples, "
             "residual / DAR: Frechet distance, accuracy (step) |", "|---|---|---|---|---|---|"]
    for s in runs:
        by_step = {r["step"]: r for r in s["rows"] if r["dar"] is not None}
        last = max(by_step)
        ratio = lambda r: r and r["step_ratio"] and ("" if r["exact"] else ">=") + format(r["step_ratio"], ".2f")
        timed = [r for r in s["rows"] if r["time_ratio"]]
        end = lead_ends(s["rows"])
        lines.append(f"| {s['label']} | " + " / ".join(ratio(by_step.get(n)) or "-" for n in (1000, 2000, 4000))
                     + f" / {ratio(by_step[last])} ({last:,}) | {'-' if end is None else format(round(end, -2), ',.0f')} | "
                     f"{by_step[last]['dar'] - by_step[last]['residual']:+.4f} ({last:,}) | "
                     + ("~" * (s["run"] in SHARED_CORES) + f"{timed[-1]['time_ratio']:.2f} ({timed[-1]['step']:,})"
                        if timed else "-") + " | "
                     + (samples(s["samples"][-1]) if s["samples"] else "-") + " |")
    return lines


def samples(q):
    """One step's sample quality of both arms, as the tables show it."""
    return (f"{q['residual_fid']:.2f} / {q['dar_fid']:.2f}, {q['residual_sample_accuracy']:.3f} / "
            f"{q['dar_sample_accuracy']:.3f} ({q['step']:,})")


def wide_table(summary, fmt):
    """Every evaluation of every run side by side: step ratio, val-loss gap (DAR - residual) and time ratio."""
    runs = sorted(summary, key=lambda s: (s["schedule"], s["depth"], s["setting"], s["seed"]))
    steps = sorted({r["step"] for s in runs for r in s["rows"]})
    lines = ["| residual step N | " + " | ".join(f"{n:,}" for n in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    bound = lambda r: "" if r["exact"] else ">="
    cells = [("DAR x fewer steps to residual@N", lambda r: r["step_ratio"] and bound(r) + fmt(r["step_ratio"], ".2f")),
             ("DAR - residual val loss", lambda r: r["dar"] is not None and format(r["dar"] - r["residual"], "+.4f")),
             ("DAR x less training time", lambda r: r["time_ratio"] and bound(r) + fmt(r["time_ratio"], ".2f"))]
    for name, cell in cells:
        for s in runs:
            by_step = {r["step"]: cell(r) for r in s["rows"]}
            lines.append(f"| {s['label']}: {name} | "
                         + " | ".join(by_step.get(n) or "-" for n in steps) + " |")
    return lines


def main():
    """summary.json, summary.md, readme_table.md and ratio.png of every run with both logs."""
    path = os.path.join(HERE, "pauses.jsonl")
    pauses = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    path = os.path.join(HERE, "restarts.jsonl")
    restarts = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    runs = sorted(d for d in os.listdir(HERE) if all(os.path.exists(os.path.join(HERE, source(d, arm), arm, "log.jsonl"))
                                                     for arm in ("residual", "dar")))
    summary = [summarize(run, pauses, restarts) for run in runs]
    with open(os.path.join(HERE, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    fmt = lambda v, f: "-" if v is None else format(v, f)
    lines = []
    for s in summary:
        lines += [f"## {s['label']} ({s['run']})", "",
                  "| residual step N | residual val loss | DAR val loss | DAR steps to residual@N | x fewer steps "
                  "| x less training time | per-t gap, residual - DAR (t = 1/16 .. 15/16) |",
                  "|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            bound = "" if r["exact"] else "<="
            lines.append(f"| {r['step']} | {r['residual']:.4f} | {fmt(r['dar'], '.4f')} | {bound}{fmt(r['dar_steps'], '.0f')} "
                         f"| {'' if r['exact'] else '>='}{fmt(r['step_ratio'], '.2f')} | {'' if r['exact'] else '>='}"
                         f"{fmt(r['time_ratio'], '.2f')} | "
                         + (" ".join(f"{g:+.4f}" for g in r["per_t_gap"]) if r["per_t_gap"] else "-") + " |")
        lines.append("")
        if s["samples"]:
            lines += ["Sample quality (score.sh), residual / DAR: Frechet distance, sample accuracy (step): "
                      + "; ".join(samples(q) for q in s["samples"]), ""]
    lines += across_seeds(summary, fmt)
    lines += ["## Every run at every evaluation", ""] + wide_table(summary, fmt) + [""]
    with open(os.path.join(HERE, "summary.md"), "w") as f:
        f.write("Written by results/long/summarize.py from the logs in results/long/.\n\n" + "\n".join(lines))
    print("\n".join(lines))
    with open(os.path.join(HERE, "readme_table.md"), "w") as f:
        f.write("\n".join(readme_table(summary, fmt)) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: ratio.png not written")
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    for s in summary:
        pts = [(r["step"], r["step_ratio"]) for r in s["rows"] if r["step_ratio"] and r["exact"]]
        ax.plot(*zip(*pts), marker="o", label=s["label"])
    ax.axhline(1, color="gray", lw=0.8, ls="--")
    ax.set(xlabel="training length: residual step N", ylabel="DAR: x fewer steps to the residual's loss at N",
           title="Does DAR's lead last? (CIFAR-10 JPEG copy; width 128 unless named)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "ratio.png"), dpi=110)


if __name__ == "__main__":
    main()
