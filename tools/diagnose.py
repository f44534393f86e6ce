"""
diagnose.py: the paper's diagnostics of trained checkpoints (EMA weights) on validation images, for a residual and
a DAR checkpoint side by side: per block, the forward RMS of the stream, the RMS of the loss gradient and the cosine
of neighbouring blocks' states (flow.png); how well t can be read from each block (probe.png); DAR's routing
weights alpha_i->l(t) and, for the residual DiT, the importance of each earlier output to each reader (heatmaps);
all numbers in diagnostics.json. The data options are train_cifar.py's.

    python tools/diagnose.py runs/quickstart/residual/ckpt.pt runs/quickstart/dar/ckpt.pt \
        --dataset shapes --image-size 16 --out runs/quickstart/diagnose
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dar_minimal import DiT, flow_statistics, routing_map, source_importance, timestep_probe  # noqa: E402
from train_cifar import load_checkpoint, load_data, parse_args, to_model_space  # noqa: E402

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None


def save_heatmap(mat, path, xlabel, ylabel, title):
    """A matrix as a PNG heatmap."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.3 * mat.shape[1], 1.0 + 0.3 * mat.shape[0]))
    im = ax.imshow(mat.numpy(), cmap="viridis", aspect="auto", origin="lower")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def side_by_side(mats):
    """Square matrices next to each other, separated by a blank (zero) column."""
    gap = torch.zeros(mats[0].shape[0], 1)
    return torch.cat([m for mat in mats for m in (mat, gap)][:-1], dim=1)


def diagnose(args):
    """The paper's diagnostics for one or two checkpoints (EMA weights) on validation images: diagnostics.json,
    flow.png (RMS, gradient RMS, cosine per block), probe.png, routing and source-importance heatmaps."""
    ckpts = {path: load_checkpoint(path, args.device) for path in args.ckpts}         # refused before any data
    data = load_data(args)
    n = min(args.val_size, 256, len(data["val_x"]))
    x1, y = to_model_space(data["val_x"][:n], args.device), data["val_y"][:n].to(args.device)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(x1.shape, generator=g).to(args.device)
    grid = [round(0.05 + 0.1 * k, 2) for k in range(10)]                     # t for the routing maps
    os.makedirs(args.out, exist_ok=True)
    report, t0 = {}, args.t[0]
    for path, ckpt in ckpts.items():
        model = DiT(**ckpt["config"]).to(args.device).eval()
        model.load_state_dict(ckpt["ema"])
        name = model.routing if model.routing not in report else f"{model.routing}_{len(report)}"
        r = dict(checkpoint=path, step=ckpt["step"], config=ckpt["config"],
                 flow={t: flow_statistics(model, x1, y, t, x0) for t in args.t},
                 probe=timestep_probe(model, x1, y, torch.Generator().manual_seed(1)))
        if model.routing == "dar":
            alpha = routing_map(model, x1, y, grid, x0)
            r["routing_t_grid"], r["routing"] = grid, alpha.tolist()
            L = alpha.shape[1] - 1
            for l in sorted({2, L // 2, L, L + 1}):
                save_heatmap(alpha[:, l - 1, :l].T, os.path.join(args.out, f"routing_{name}_reader{l}.png"),
                             "t = 0.05 + 0.1 k (k on the axis)", "source i",
                             f"alpha_i->{l}(t), reader {l}" + (" (final)" if l == L + 1 else ""))
            few = (0, len(grid) // 2, len(grid) - 1)
            save_heatmap(side_by_side([alpha[k] for k in few]), os.path.join(args.out, f"routing_{name}_overview.png"),
                         "source i (one panel per t)", f"reader l - 1 ({L} = final)",
                         "alpha_i->l at t = " + ", ".join(str(grid[k]) for k in few))
        else:
            imp = source_importance(model, x1, y, grid, x0)
            r["importance_t_grid"], r["importance"] = grid, imp.tolist()
            few = (0, len(grid) // 2, len(grid) - 1)
            save_heatmap(side_by_side([imp[k].abs() / imp[k].abs().max() for k in few]),
                         os.path.join(args.out, f"importance_{name}_overview.png"), "source i (one panel per t)",
                         f"reader l - 1 ({imp.shape[1] - 1} = final)",
                         "|dL/dgate_i->l| / max at t = " + ", ".join(str(grid[k]) for k in few))
        report[name] = r
        print(f"{name}: forward RMS at t={t0} {['%.2f' % v for v in r['flow'][t0]['forward_rms']]}")
    with open(os.path.join(args.out, "diagnostics.json"), "w") as f:
        json.dump(report, f)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, r in report.items():
        for ax, key in zip(axes, ("forward_rms", "gradient_rms", "cosine")):
            ax.plot(range(1, len(r["flow"][t0][key]) + 1), r["flow"][t0][key], marker="o", label=name)
    for ax, title in zip(axes, ("forward RMS(z_k)", "gradient RMS(dL/dz_k)", "cos(z_k, z_k+1)")):
        ax.set(xlabel="block k", title=f"{title} at t = {t0}")
    axes[0].set_yscale("log"), axes[1].set_yscale("log"), axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "flow.png"), dpi=100)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, r in report.items():
        ax.plot(range(1, len(r["probe"]["blocks"]) + 1), r["probe"]["blocks"], marker="o", label=name)
    ax.axhline(next(iter(report.values()))["probe"]["raw_xt"], color="gray", ls="--", label="raw x_t")
    ax.set(xlabel="block k", ylabel="R^2 of t from pooled z_k", title="timestep probe (ridge, held out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "probe.png"), dpi=100)
    plt.close("all")
    return report


# ----------------------------------------------------------------------------------------------------
# Comparison, sampling from a checkpoint, entry point
# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    """Options: one or two checkpoints, --t, --out, and train_cifar.py's data options (--dataset, --data-dir, ...)."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                epilog="data options: as train_cifar.py (--dataset, --data-dir, --val-dir, "
                                       "--data-path, --image-size, --val-size, --device)")
    p.add_argument("ckpts", nargs="+", metavar="CKPT", help="one or two checkpoints of train_cifar.py")
    p.add_argument("--t", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25],
                   help="t of the flow statistics (the figure shows the first)")
    p.add_argument("--out", default="runs/diagnose")
    own, rest = p.parse_known_args(argv)
    if len(own.ckpts) > 2 or not all(0 <= t <= 1 for t in own.t):
        p.error(f"expected one or two checkpoints and --t values in [0, 1], got {own.ckpts} and {own.t}")
    if plt is None:
        p.error("the pictures need matplotlib (pip install matplotlib)")
    args = parse_args(rest + ["--out", own.out])                        # the data options, checked as for training
    args.ckpts, args.t = own.ckpts, own.t
    return diagnose(args)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
