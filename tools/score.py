"""
score.py: sample quality of train_cifar.py checkpoints (EMA weights), as --fid-every measures it during training:
class-conditional samples (labels 0, 1, 2, ...: every class equally often), their Frechet distance to the reference
images in the features of --fid-backend and, with the classifier, the share of samples it recognises as their class. --draws N scores each
checkpoint N times with other noise, to see the measure's own spread. Options other than these are train_cifar.py's
(data, --fid-*, --sample-steps, --sampler, --cfg-scale, --device).

    python tools/score.py runs/long/d8/residual/ckpt_0002000.pt runs/long/d8/dar/ckpt_0002000.pt \\
        --dataset folder --data-dir DIR/train --val-dir DIR/test --fid-backend classifier \\
        --fid-weights results/classifier/cifar10.pt --fid-samples 2000 --sample-steps 10 --draws 2 --out scores.json
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dar_minimal import DiT  # noqa: E402
from tools import fid  # noqa: E402
from train_cifar import load_checkpoint, load_data, parse_args, sample_quality  # noqa: E402


def main(argv=None):
    """Scores each checkpoint --draws times; prints one line each and writes --out (JSON)."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                epilog="other options: train_cifar.py's (data, --fid-backend, --fid-weights, "
                                       "--fid-samples, --sample-steps, --sampler, --cfg-scale, --device)")
    p.add_argument("ckpts", nargs="+", metavar="CKPT")
    p.add_argument("--draws", type=int, default=1)
    p.add_argument("--first-draw", type=int, default=0, help="draws first-draw .. first-draw + draws - 1")
    p.add_argument("--out", help="a JSON file for the scores")
    own, rest = p.parse_known_args(argv)
    if own.draws < 1 or own.first_draw < 0:
        p.error(f"--draws must be positive and --first-draw >= 0, got {own.draws} and {own.first_draw}")
    args = parse_args(rest + ["--out", "runs/score"])                  # where the reference statistics are cached
    os.makedirs(args.out, exist_ok=True)
    ckpts = {path: load_checkpoint(path, args.device) for path in own.ckpts}      # refused before any data
    data = load_data(args)
    if data["decode"] is None:
        raise ValueError("samples of latents are scored as images: give --vae NAME (a diffusers AutoencoderKL)")
    fid_ref = fid.setup(data, args)
    if fid_ref is None:
        raise ValueError(f"--fid-backend {args.fid_backend} is not available here (see the line above)")
    rows = []
    for path, ckpt in ckpts.items():
        model = DiT(**ckpt["config"]).to(args.device).eval()
        model.load_state_dict(ckpt["ema"])
        for draw in range(own.first_draw, own.first_draw + own.draws):
            t0 = time.time()
            arm_and_file = os.path.join(*os.path.normpath(path).split(os.sep)[-2:])      # not this machine's path
            row = dict(checkpoint=arm_and_file, step=ckpt["step"], routing=model.routing, draw=draw,
                       **sample_quality(model, fid_ref, args, data["decode"], draw), seconds=time.time() - t0)
            rows.append(row)
            print(f"{path} (step {row['step']}, {row['routing']}, draw {draw}): FD {row['fid']:.3f}"
                  + (f", sample accuracy {row['sample_accuracy']:.3f}" if "sample_accuracy" in row else "")
                  + f" ({row['seconds']:.0f} s)", flush=True)
    result = dict(rows=rows, backend=args.fid_backend, weights=args.fid_weights, samples=args.fid_samples,
                  sample_steps=args.sample_steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
                  reference=args.fid_reference, command=" ".join(["python", "tools/score.py"] + (argv or sys.argv[1:])))
    if own.out:
        with open(own.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
