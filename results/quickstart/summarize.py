"""Three-seed summary of the quick start (results/quickstart/run.sh): per data set, DAR's advantage in steps and in
training time at the residual arm's final validation loss, with the seed spread.

    python results/quickstart/summarize.py        writes results/quickstart/summary.json and summary.md
"""
import glob
import json
import os
import re
import statistics

R = "results/quickstart"


def spread(values):
    """Mean and (min, max) of the values that exist; None where none does."""
    v = [x for x in values if x is not None]
    return (statistics.mean(v), min(v), max(v)) if v else None


def fmt(s, digits=2):
    """'mean (min-max)' of a spread."""
    return "-" if s is None else f"{s[0]:.{digits}f} ({s[1]:.{digits}f}-{s[2]:.{digits}f})"


def ratio_at_each_evaluation(res, dar):
    """For each evaluation N of the residual arm: N / (DAR's steps to the residual's loss at N), interpolated between
    DAR's evaluations; None where DAR never got there, a lower bound ('>=') where it was already below at its first."""
    out = []
    for n, target in zip(res["steps"], res["val_loss"]):
        got, prev = None, None
        for m, v in zip(dar["steps"], dar["val_loss"]):
            if v <= target:
                got = (m, False) if prev is None else (prev[0] + (prev[1] - target) / (prev[1] - v) * (m - prev[0]), True)
                break
            prev = (m, v)
        out.append(None if got is None else dict(ratio=n / got[0], exact=got[1]))
    return out


rows = []
for path in sorted(glob.glob(f"{R}/*_s*/compare.json")):
    data, seed = re.search(r"([\w.-]+?)_s(\d+)/compare.json", path).groups()
    c = json.load(open(path))
    wall = os.path.join(os.path.dirname(path), "wall.json")
    res, dar = c["arms"]["residual"], c["arms"]["dar"]
    rows.append(dict(data=data, seed=int(seed), steps=c["residual_final_step"],
                     residual_val=res["final_val_loss"], dar_val=dar["final_val_loss"],
                     speedup_in_steps=c["speedup_in_steps"], speedup_in_train_time=c["speedup_in_train_time"],
                     residual_val_curve=res["val_loss"], dar_val_curve=dar["val_loss"], eval_steps=res["steps"],
                     ratio_at_each_evaluation=ratio_at_each_evaluation(res, dar),
                     train_seconds=res["train_seconds"] + dar["train_seconds"],
                     eval_seconds=res["eval_seconds"] + dar["eval_seconds"],
                     wall_seconds=json.load(open(wall))["wall_seconds"] if os.path.exists(wall) else None,
                     machine=c["machine"]))
summary = {}
for data in sorted({r["data"] for r in rows}):
    rs = [r for r in rows if r["data"] == data]
    summary[data] = dict(seeds=[r["seed"] for r in rs], runs=rs,
                         residual_val=spread([r["residual_val"] for r in rs]), dar_val=spread([r["dar_val"] for r in rs]),
                         dar_minus_residual=spread([r["dar_val"] - r["residual_val"] for r in rs]),
                         speedup_in_steps=spread([r["speedup_in_steps"] for r in rs]),
                         speedup_in_train_time=spread([r["speedup_in_train_time"] for r in rs]),
                         wall_seconds=spread([r["wall_seconds"] for r in rs]),
                         eval_share=spread([r["eval_seconds"] / (r["train_seconds"] + r["eval_seconds"]) for r in rs]),
                         reached_in_steps=sum(r["speedup_in_steps"] is not None for r in rs),
                         reached_in_time=sum(r["speedup_in_train_time"] is not None for r in rs))
json.dump(summary, open(f"{R}/summary.json", "w"), indent=1)
lines = ["| data | seeds | final val loss, residual | DAR | DAR - residual | x fewer steps | x less training time | "
         "whole command, s (with other runs on the cores: not a timing; see below) | evaluation share |", "|---|---|---|---|---|---|---|---|---|"]
for data, s in summary.items():
    lines.append(f"| {data} | {len(s['seeds'])} | {fmt(s['residual_val'], 4)} | {fmt(s['dar_val'], 4)} | "
                 f"{fmt(s['dar_minus_residual'], 4)} | {fmt(s['speedup_in_steps'])} ({s['reached_in_steps']} of "
                 f"{len(s['seeds'])} reached) | {fmt(s['speedup_in_train_time'])} ({s['reached_in_time']} of "
                 f"{len(s['seeds'])} reached) | {fmt(s['wall_seconds'], 0)} | {fmt(s['eval_share'])} |")
lines += ["", "mean (min-max) over seeds; 'x fewer steps' and 'x less training time' only over the seeds in which DAR "
          "reached the residual arm's final validation loss. Per seed:", "",
          "| data | seed | residual val loss at each evaluation | DAR | x fewer steps | x less training time | "
          "whole command, s |", "|---|---|---|---|---|---|---|"]
for r in rows:
    f = lambda v: "-" if v is None else f"{v:.2f}"
    lines.append(f"| {r['data']} | {r['seed']} | {', '.join(f'{v:.4f}' for v in r['residual_val_curve'])} | "
                 f"{', '.join(f'{v:.4f}' for v in r['dar_val_curve'])} | {f(r['speedup_in_steps'])} | "
                 f"{f(r['speedup_in_train_time'])} | {r['wall_seconds']} |")
lines += ["", "DAR: x fewer steps to the residual's loss at each of its evaluations N (mean over seeds, '>=' a lower "
          "bound: DAR below it at its first evaluation; '-' where DAR did not get there in some seed):", "",
          "| data | " + " | ".join(f"evaluation {k + 1}: N, ratio" for k in range(len(rows[0]["eval_steps"]))) + " |",
          "|---|" + "---|" * len(rows[0]["eval_steps"])]
for data, s in summary.items():
    cells = []
    for k in range(len(s["runs"][0]["eval_steps"])):
        got = [r["ratio_at_each_evaluation"][k] for r in s["runs"]]
        if any(g is None for g in got):
            cells.append(f"{s['runs'][0]['eval_steps'][k]}: -")
        else:
            mean = statistics.mean(g["ratio"] for g in got)
            cells.append(f"{s['runs'][0]['eval_steps'][k]}: " + ("" if all(g["exact"] for g in got) else ">=") + f"{mean:.2f} "
                         f"({min(g['ratio'] for g in got):.2f}-{max(g['ratio'] for g in got):.2f})")
    lines.append(f"| {data} | " + " | ".join(cells) + " |")
for path in sorted(glob.glob(f"{R}/timed/*.json")):                    # the README's commands, alone, as written
    t = json.load(open(path))
    lines += ["", f"Timed alone, as written (`{os.path.relpath(path)}`): `{t['command']}`: {t['wall_seconds']} s"]
lines += ["", f"Machine: {rows[0]['machine'] if rows else '-'}"]
open(f"{R}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
