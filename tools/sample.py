"""
sample.py: samples of a train_cifar.py checkpoint's EMA weights, every class equally often (labels 0, 1, 2, ... in
turn): a grid PNG of the first 100 and an .npz of all of them as uint8 N x H x W x 3 under the key arr_0, what ADM's
evaluator reads (the suite behind published ImageNet FIDs, fed the same way by DiT's sample_ddp.py), beside the
checkpoint. A latent model's samples are decoded by its autoencoder (--vae, or the one its run's latents directory
names), a chunk of 500 at a time: only the uint8 images are kept.

    python tools/sample.py runs/quickstart/dar/ckpt.pt --num-samples 1000 --sample-steps 50
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dar_minimal import DiT  # noqa: E402
from tools import fid  # noqa: E402
from tools.encode_latents import decoder, recorded_autoencoder  # noqa: E402
from tools.grid import save_grid  # noqa: E402
from train_cifar import generate, load_checkpoint  # noqa: E402


def main(argv=None):
    """Writes <ckpt>_samples<N>.png and .npz; labels cycle through the classes, noise seeds are fixed."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    a = p.add_argument
    a("ckpt", help="a checkpoint of train_cifar.py")
    a("--num-samples", type=int, default=100)
    a("--sample-steps", type=int, default=50)
    a("--sampler", default="euler", choices=["euler", "heun", "sde"])
    a("--cfg-scale", type=float, default=1.5, help="1: no guidance")
    a("--precision", default="fp32", choices=["fp32", "bf16"])
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--vae", help="a latent model's diffusers AutoencoderKL (default: the one named by the latents directory in the "
                    "run's config.json beside the checkpoint; none: the latents' first 3 channels as they are)")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.sample_steps < 1:
        p.error(f"--num-samples and --sample-steps must be positive, got {args.num_samples} and {args.sample_steps}")
    ckpt = load_checkpoint(args.ckpt, args.device)
    model = DiT(**ckpt["config"]).to(args.device).eval()
    model.load_state_dict(ckpt["ema"])
    decode = None
    if ckpt.get("stream", {}).get("dataset") == "latents":
        config = os.path.join(os.path.dirname(args.ckpt), "config.json")
        run = {}
        if os.path.isfile(config):
            with open(config) as f:
                run = json.load(f)["args"]
        decode = decoder(args.vae or recorded_autoencoder(run.get("data_path")), args.device, required=bool(args.vae))
        if decode is None:
            print("note: a latent model without an autoencoder: the grid and .npz show the latents' first 3 channels")
    labels, images = fid.sample_labels(args.num_samples, model.num_classes), []
    for j, part in fid.chunks(args.num_samples):                  # the noise seeded per chunk, as in training
        x = generate(model, len(labels[part]), args, seed=1 + fid.CHUNK * j, labels=labels[part].to(args.device))
        x = decode(x) if decode else x
        images.append(((x[:, :3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    images = torch.cat(images)
    stem = os.path.splitext(args.ckpt)[0] + f"_samples{args.num_samples}"
    save_grid(images[:100].permute(0, 3, 1, 2).float() / 127.5 - 1, stem + ".png", nrow=min(10, model.num_classes))
    np.savez(stem + ".npz", images.numpy())                          # arr_0, as ADM's evaluator reads it
    print(f"wrote {stem}.png and {stem}.npz ({len(images)} samples)")
    return stem


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
