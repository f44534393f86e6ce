"""
diagnostics_table.py: the paper's three symptoms of the residual stream, per depth and arm, from the diagnostics of
the long runs (results/long/<run>/diagnostics_<step>/, made by diagnose.sh) beside those of the depth sweep
(results/depth/diagnostics_d<depth>/, 500 steps at width 128). Writes results/long/diagnostics.md and .json.

At t = 1.0 and t = 0.5, per checkpoint: gradient RMS of the first block over the last (the paper: more than 10x in
SiT-XL/2's 28 blocks), forward RMS of the last block over the first (the paper: about 100x), the mean cosine of
neighbouring blocks' outputs and its mean over the last third of the stack (the paper: above 0.9 in the deep stack).
"""
import glob
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
TS = ("1.0", "0.5")


def rows_of(path, source):
    """One row per arm of a diagnostics.json."""
    with open(path) as f:
        report = json.load(f)
    rows = []
    for arm, r in report.items():
        c = r["config"]
        if c["routing"] == "dar":
            arm = f"dar ({c['dar_query']}, chunk {c['dar_chunk']})"
        row = dict(source=source, arm=arm, depth=c["depth"], width=c["hidden_size"], step=r["step"])
        for t in TS:
            f = r["flow"][t]
            last_third = f["cosine"][-max(1, len(f["cosine"]) // 3):]
            row[t] = dict(grad_first_over_last=f["gradient_rms"][0] / f["gradient_rms"][-1],
                          rms_last_over_first=f["forward_rms"][-1] / f["forward_rms"][0],
                          mean_cosine=statistics.mean(f["cosine"]), mean_cosine_last_third=statistics.mean(last_third))
        rows.append(row)
    return rows


def main():
    """Reads every diagnostics.json, writes the table."""
    rows = []
    for path in sorted(glob.glob(os.path.join(HERE, "..", "depth", "diagnostics_d*", "diagnostics.json"))):
        rows += rows_of(path, "results/depth")
    for path in glob.glob(os.path.join(HERE, "*", "diagnostics_*", "diagnostics.json")):
        rows += rows_of(path, "results/long/" + os.path.basename(os.path.dirname(os.path.dirname(path))))
    rows.sort(key=lambda r: (r["depth"], -r["width"], r["step"], r["arm"] != "residual", r["source"], r["arm"]))
    with open(os.path.join(HERE, "diagnostics.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["Written by results/long/diagnostics_table.py. EMA weights, 256 test images, fixed noise; z_k: the block's",
             "output (DAR: the aggregated state handed on). grad first/last: gradient RMS of block 1 over block K;",
             "RMS last/first: forward RMS of block K over block 1; cos: mean cos(z_k, z_k+1), all blocks / last third.", ""]
    for t in TS:
        lines += [f"## t = {t}", "", "| blocks x width | step | arm | grad first/last | RMS last/first | cos | cos, last third "
                  "| from |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            d = r[t]
            lines.append(f"| {r['depth']} x {r['width']} | {r['step']:,} | {r['arm']} | {d['grad_first_over_last']:.3g} | "
                         f"{d['rms_last_over_first']:.3g} | {d['mean_cosine']:.3f} | {d['mean_cosine_last_third']:.3f} "
                         f"| {r['source']} |")
        lines.append("")
    with open(os.path.join(HERE, "diagnostics.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
