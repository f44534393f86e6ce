"""
encode_latents.py: images -> latents for `train_cifar.py --dataset latents`, the paper's setting (DiT on Stable
Diffusion VAE latents): every image of an ImageFolder tree is resized and centre-cropped to --image-size (ADM's crop,
as DiT does), encoded by a pretrained diffusers AutoencoderKL, and its posterior's mean (or a sample) scaled by the
autoencoder's scaling factor (0.18215 for SD-VAE; after its shift factor, where it has one). Writes, into OUT:
  latents.npy  (N, C, H, W) float16, read row by row by train_cifar.py (32 x 32 x 4 per image at 256: 8 KB)
  latents_mirrored.npy  with --mirror: the latents of the mirrored images, row for row; training then takes one of
               the two at random (a mirror drawn per sample); without it latents are never mirrored, as in SD-VAE
               latent space a mirrored latent is not the latent of the mirrored image
  labels.npy   (N,) int64, the class folders' indices (sorted names, as ImageFolder)
  latents.json what made them: autoencoder, size, scale, shift, posterior, mirror, classes, rows done so far
An interrupted run continues where it stopped (the same command); a finished one, or one with other settings, is
never overwritten. Needs the optional package diffusers (pip install diffusers) and the autoencoder's weights (from
the Hugging Face hub on first use, or a local directory). Also used by train_cifar.py and tools/sample.py to decode
latents back to images (decoder).

    python tools/encode_latents.py /data/imagenet/train latents/in256 --image-size 256        # one GPU
    python train_cifar.py --preset S --dataset latents --data-path latents/in256 --patch-size 2 --precision bf16
"""
import argparse
import functools
import json
import os
import sys
import warnings

import numpy as np
import torch
from tqdm import tqdm

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


def center_crop(image, size):
    """ADM's centre crop of a PIL image (as DiT uses), in RGB: halve with a box filter while the short side is at least
    2 x size, resize the short side to size (bicubic), then cut the centre size x size."""
    from PIL import Image
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_autoencoder(name, device):
    """The diffusers AutoencoderKL `name` (hub name or local directory), frozen, in eval mode; ValueError in one line
    when diffusers is missing or the weights cannot be loaded."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError(f"the autoencoder {name!r} needs the optional package diffusers "
                         "(pip install diffusers)") from None
    import huggingface_hub
    huggingface_hub.utils.logging.set_verbosity_error()               # no retry lines: one line if it fails
    print(f"loading the autoencoder {name} (diffusers)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae = AutoencoderKL.from_pretrained(name, low_cpu_mem_usage=False)
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"could not load the autoencoder {name!r} ({type(e).__name__}: {why}): no network here, or "
                         "not an AutoencoderKL? Offline, give the directory of a saved one (save_pretrained)") from None
    return vae.eval().requires_grad_(False).to(device)


def scaling(vae):
    """(scale, shift) of an autoencoder: latents for the model are (z - shift) * scale (no shift where its config has
    none, as in older diffusers releases and SD-VAE)."""
    return vae.config["scaling_factor"], vae.config.get("shift_factor") or 0.0


def decoder(name, device, required=True, batch=16):
    """A function: latents (N, C, H, W) as the model sees them -> images (N, 3, H', W') in [-1, 1] on the CPU,
    decoded by the autoencoder `name` in batches. None for no name or "none", and, unless required, with one line
    when the autoencoder cannot be loaded (a required one: ValueError)."""
    if not name or name == "none":
        return None
    try:
        vae = load_autoencoder(name, device)
    except ValueError as e:
        if required:
            raise
        print(f"note: samples stay latents, without grids or FID ({e})")
        return None
    scale, shift = scaling(vae)

    @torch.no_grad()
    def decode(z):
        """Latents -> images in [-1, 1]."""
        return torch.cat([vae.decode(z[i:i + batch].to(device).float() / scale + shift).sample.clamp(-1, 1).cpu()
                          for i in range(0, len(z), batch)])
    decode.autoencoder = name
    return decode


def recorded_autoencoder(data_path):
    """The autoencoder named in the latents.json of a latents directory, or None."""
    meta = os.path.join(data_path or "", "latents.json")
    if not os.path.isfile(meta):
        return None
    with open(meta) as f:
        return json.load(f).get("autoencoder")


def write_json(record, path):
    """JSON written atomically (a temporary file, then a rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None):
    """Encodes the ImageFolder tree into OUT (continuing an interrupted run); returns OUT."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("images", help="an ImageFolder tree: one subfolder of images per class")
    a("out", help="the latents directory to write")
    a("--vae", default=DEFAULT_VAE, help="a diffusers AutoencoderKL: hub name or local directory")
    a("--image-size", type=int, default=256, help="the images' size before encoding (latents: size / 8 for SD-VAE)")
    a("--posterior", default="mean", choices=["mean", "sample"], help="the posterior's mean, or a sample (seeded)")
    a("--batch-size", type=int, default=32)
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-reading processes")
    a("--mirror", action="store_true", help="also store the latents of the mirrored images (twice the disk), for "
                                          "random mirroring in training")
    a("--seed", type=int, default=0,
      help="--posterior sample: the noise of batch k is seeded by seed + k (a continued run keeps --batch-size)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.image_size < 1 or args.batch_size < 1:
        p.error(f"--image-size and --batch-size must be positive, got {args.image_size} and {args.batch_size}")
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(args.images):
        raise ValueError(f"expected an ImageFolder directory of images (class subfolders), got {args.images!r}")
    try:
        ds = ImageFolder(args.images, transform=T.Compose([functools.partial(center_crop, size=args.image_size),
                                                           T.PILToTensor()]))
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f"no images found in {args.images!r} (expected class subfolders of images): {e}") from None
    vae = load_autoencoder(args.vae, args.device)                          # one line when it cannot be had
    scale, shift = scaling(vae)
    name = os.path.abspath(args.vae) if os.path.isdir(args.vae) else args.vae    # a local one: from anywhere
    meta = dict(autoencoder=name, image_size=args.image_size, scale=scale, shift=shift, posterior=args.posterior,
                seed=args.seed, batch_size=args.batch_size, classes=ds.classes, images=os.path.abspath(args.images),
                count=len(ds), mirror=args.mirror)
    paths = {k: os.path.join(args.out, k) for k in ("latents.npy", "latents_mirrored.npy", "labels.npy", "latents.json")}
    done = 0
    if os.path.exists(paths["latents.json"]):
        with open(paths["latents.json"]) as f:
            old = json.load(f)
        done = old.pop("done", 0)
        if old != meta:
            diff = ", ".join(f"{k}: {old.get(k)!r} (now {v!r})" for k, v in meta.items() if old.get(k) != v)
            raise ValueError(f"{args.out!r} holds latents made otherwise ({diff}); choose another directory")
        if done == len(ds):
            print(f"{args.out} is already complete ({done} latents): nothing to do")
            return args.out
        print(f"continuing {args.out} at {done} of {len(ds)} images")
    elif os.path.exists(args.out) and os.listdir(args.out):
        raise ValueError(f"{args.out!r} exists and is not a latents directory of this script; choose another")
    os.makedirs(args.out, exist_ok=True)
    rest = torch.utils.data.Subset(ds, range(done, len(ds)))
    loader = torch.utils.data.DataLoader(rest, batch_size=args.batch_size, num_workers=args.workers)
    files = ["latents.npy", "latents_mirrored.npy"] if args.mirror else ["latents.npy"]
    offset = np.load(paths["latents.npy"], mmap_mode="r").offset if done else None    # where the rows begin
    for k, (x, _) in enumerate(tqdm(loader, desc="encoding", initial=done // args.batch_size,
                                    total=-(-len(ds) // args.batch_size)), start=done // args.batch_size):
        x = x.to(args.device).float() / 127.5 - 1
        for file, images in zip(files, (x, x.flip(-1))):       # the images, then (--mirror) their mirror images
            with torch.no_grad():
                posterior = vae.encode(images).latent_dist
                g = torch.Generator(args.device).manual_seed(args.seed + k)
                z = posterior.mean if args.posterior == "mean" else posterior.sample(generator=g)
                z = ((z - shift) * scale).cpu().numpy().astype(np.float16)
            if not done:                       # the first batch tells the latents' shape: each file at full size
                np.save(paths["labels.npy"], np.array(ds.targets, dtype=np.int64))
                offset = np.lib.format.open_memmap(paths[file], mode="w+", dtype=np.float16,
                                                   shape=(len(ds), *z.shape[1:])).offset
            with open(paths[file], "r+b") as f:                # written, not mapped: the process stays small
                f.seek(offset + done * z[0].nbytes)
                f.write(z.tobytes())
        done += len(z)                                         # the rows first, then the record that they are there
        write_json(dict(meta, done=done), paths["latents.json"])
    print(f"wrote {len(ds)} latents {tuple(z.shape[1:])} to {args.out}")
    return args.out


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
