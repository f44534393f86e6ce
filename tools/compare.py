"""
compare.py: the residual and DAR arms of a run side by side: compare.json, a summary in the terminal, compare.png.
train_cifar.py calls compare() after training both arms; as a script it compares the arms of a run from their logs
(arms trained one at a time, or a run stopped and continued):

    python tools/compare.py runs/quickstart            # reads runs/quickstart/{residual,dar}/log.jsonl
"""
import json
import os
import sys


def steps_to_reach(evals, target, key="step"):
    """First evaluation whose val loss <= target: its key ("step" or "train_seconds"), and a linear interpolation of
    that key between evaluations; (None, None) if no evaluation reached it."""
    prev = None
    for r in evals:
        if r["val_loss"] <= target:
            if prev is None:
                return r[key], float(r[key])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - r["val_loss"])
            return r[key], prev[key] + frac * (r[key] - prev[key])
        prev = r
    return None, None


LONG_RUNS = ("A lead early in training need not last: in the long runs on CIFAR-10 (README, 'Does the lead last?') "
             "at width 128 DAR's lead was gone by about 4,000 steps at 8 blocks (within 0.001 after, two seeds) and by "
             "about 2,300 at 12 (behind after, one seed); at width 64 it lasted to 8,000 steps, at 24 blocks (1.41x and "
             "1.27x, two seeds, shrinking) and at 8 blocks (1.39x, one seed): the width, not the depth.")


def compare(records, out, val_t=None):
    """compare.json, a summary in the terminal and compare.png (validation loss against steps and against training
    time; needs matplotlib) in out, from the log records of the residual and DAR arms (val_t: their grid of t)."""
    arms = {k: [r for r in v if r["kind"] == "eval"] for k, v in records.items()}
    done = {k: [r for r in v if r["kind"] == "done"] for k, v in records.items()}
    res, dar = arms["residual"], arms["dar"]
    target = res[-1]["val_loss"]
    first, interp = steps_to_reach(dar, target)
    _, seconds = steps_to_reach(dar, target, key="train_seconds")
    summary = dict(
        val_t_grid=val_t,
        arms={k: dict(steps=[r["step"] for r in v], val_loss=[r["val_loss"] for r in v],
                      train_seconds_at_eval=[r.get("train_seconds") for r in v],
                      val_loss_per_t=[r["val_loss_per_t"] for r in v], final_val_loss=v[-1]["val_loss"],
                      train_seconds=done[k][-1]["train_seconds"] if done[k] else None,      # all segments
                      eval_seconds=done[k][-1].get("eval_seconds") if done[k] else None,
                      **({"fid": [r.get("fid") for r in v]} if any("fid" in r for r in v) else {}))
              for k, v in arms.items()},
        residual_final_step=res[-1]["step"], residual_final_val_loss=target,
        residual_final_train_seconds=res[-1]["train_seconds"],
        dar_steps_to_residual_final=first, dar_steps_to_residual_final_interpolated=interp,
        speedup_in_steps=(res[-1]["step"] / interp) if interp else None,
        dar_train_seconds_to_residual_final=seconds,
        speedup_in_train_time=(res[-1]["train_seconds"] / seconds) if seconds else None,
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        machine=next((d[-1].get("device") for d in done.values() if d), None))
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(summary, f, indent=1)
    picture = os.path.join(out, "compare.png")
    drawn = plot_comparison(arms, target, picture)
    print(summary_text(summary, picture if drawn else None))
    return summary


def summary_text(summary, picture):
    """The comparison in a few lines: final losses, DAR's steps and training time to the residual's final loss."""
    res, dar = summary["arms"]["residual"], summary["arms"]["dar"]
    n, t = summary["residual_final_step"], summary["residual_final_train_seconds"]
    lines = [f"final val loss: residual {res['final_val_loss']:.4f}, DAR {dar['final_val_loss']:.4f} "
             f"(lower is better; step {n})"]
    if summary["speedup_in_steps"]:
        lines.append(f"DAR reached the residual's final val loss at step ~{summary['dar_steps_to_residual_final_interpolated']:.0f}"
                     f" of {n}: {summary['speedup_in_steps']:.2f}x fewer steps")
    else:
        lines.append(f"DAR did not reach the residual's final val loss within {n} steps: no speed-up in steps")
    if summary["speedup_in_train_time"]:
        lines.append(f"in training time: ~{summary['dar_train_seconds_to_residual_final']:.0f} s against the residual's "
                     f"{t:.0f} s: {summary['speedup_in_train_time']:.2f}x less training time")
    else:
        lines.append(f"in training time: not within the residual's {t:.0f} s")
    if res["train_seconds"] is not None and dar["train_seconds"] is not None:
        lines.append("time: " + ", ".join(f"{k} {a['train_seconds']:.0f} s training + {a['eval_seconds']:.0f} s evaluation"
                                          for k, a in summary["arms"].items()))
    lines.append(f"picture: {picture}" if picture else
                 "picture: not drawn (matplotlib is not installed); compare.json has the numbers")
    lines.append(LONG_RUNS)
    return "\n".join(lines)


def plot_comparison(arms, target, path):
    """Validation loss of each arm against steps and against training time, side by side; False without matplotlib."""
    try:
        from matplotlib.figure import Figure             # no pyplot: leaves a notebook's (or any) backend alone
    except ImportError:
        return False
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2, sharey=True)
    for k, v in arms.items():
        for ax, key in zip(axes, ("step", "train_seconds")):
            ax.plot([r[key] for r in v], [r["val_loss"] for r in v], marker="o", label=k)
    for ax, label in zip(axes, ("training step", "training time, s (evaluation excluded)")):
        ax.axhline(target, color="gray", lw=0.5, ls="--")
        ax.set(xlabel=label)
    axes[0].set(ylabel="validation loss (EMA weights)", title=os.path.basename(os.path.dirname(path) or "."))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True



def main(argv=None):
    """Compares the arms in a run directory from their logs and configs."""
    import argparse
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("run", help="a --out directory of train_cifar.py holding residual/ and dar/")
    args = p.parse_args(argv)
    records, val_t = {}, None
    for arm in ("residual", "dar"):
        path = os.path.join(args.run, arm, "log.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"{args.run!r} holds no {arm} arm ({path} is missing): train both arms first")
        with open(path) as f:
            records[arm] = [json.loads(line) for line in f if line.strip()]
        if not any(r["kind"] == "eval" for r in records[arm]):
            raise ValueError(f"{path} has no evaluation yet")
        config = os.path.join(args.run, arm, "config.json")
        if os.path.isfile(config):
            with open(config) as f:
                val_t = json.load(f).get("val_t", val_t)
    return compare(records, args.run, val_t)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
