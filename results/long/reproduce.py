"""
reproduce.py: does today's code give a committed residual arm? Compares the validation losses of a rerun (by default
runs/long/d8_s0_repro/residual, 1,000 steps of results/long/run.sh) with the committed arm (results/long/d8_s0/residual)
at every evaluation both have, to 4 decimals, and writes results/long/reproduce.json (or OUT) with the largest
difference. Only if every one agrees may a DAR-only run be compared with the committed arm (results/long/<run>/
residual_from). From the repository root:
    python results/long/reproduce.py [RERUN_DIR [COMMITTED_DIR [OUT]]]
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def val_losses(arm_dir):
    """{step: validation loss} of an arm's log.jsonl."""
    with open(os.path.join(arm_dir, "log.jsonl")) as f:
        return {r["step"]: r["val_loss"] for r in map(json.loads, filter(str.strip, f)) if r["kind"] == "eval"}


def main():
    """Prints and writes the comparison; exit code 1 when a loss differs in the 4th decimal."""
    rerun = sys.argv[1] if len(sys.argv) > 1 else "runs/long/d8_s0_repro/residual"
    committed = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "d8_s0", "residual")
    a, b = val_losses(rerun), val_losses(committed)
    rows = [dict(step=s, rerun=a[s], committed=b[s], same_to_4_decimals=round(a[s], 4) == round(b[s], 4))
            for s in sorted(set(a) & set(b))]
    for r in rows:
        print(f"step {r['step']}: rerun {r['rerun']:.6f}, committed {r['committed']:.6f}, "
              f"{'same' if r['same_to_4_decimals'] else 'DIFFERENT'} to 4 decimals")
    reproduced = bool(rows) and all(r["same_to_4_decimals"] for r in rows)
    largest = max((abs(r["rerun"] - r["committed"]) for r in rows), default=None)
    print(f"largest difference: {largest:.2g}" if rows else "no evaluation in common")
    out = sys.argv[3] if len(sys.argv) > 3 else os.path.join(HERE, "reproduce.json")
    with open(out, "w") as f:
        json.dump(dict(rerun=rerun, committed=os.path.relpath(committed), rows=rows, reproduced=reproduced,
                       largest_difference=largest), f, indent=1)
    print("reproduced" if reproduced else "NOT reproduced: rerun the residual arm too")
    sys.exit(0 if reproduced else 1)


if __name__ == "__main__":
    main()
