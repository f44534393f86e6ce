"""
train_cifar.py: train a DiT with residual or DAR routing by flow matching, and compare the two side by side.

    python train_cifar.py --preset quick --dataset shapes --image-size 16 --patch-size 2 \
        --batch-size 32 --steps 800 --lr 2e-3                                                   # CPU, five minutes
    python train_cifar.py --preset S --dataset cifar10 --precision bf16                        # one GPU
    torchrun --standalone --nproc_per_node 4 train_cifar.py --preset S --dataset cifar10 --precision bf16

Both arms of a comparison see the same initial weights (the router is created last), the same data order and
the same t, noise, flip and label-dropout draws: every random draw of training is a function of (seed, step),
made for the whole batch (each torchrun process and each --micro-batch takes its part, so they train as one process
with the whole batch would), which also makes --resume exact. Evaluation uses
the EMA weights, a fixed validation subset, a fixed grid of t and fixed noise, identical for every evaluation and
both arms. Secondary jobs have their own scripts in tools/: samples of a checkpoint (sample.py), the paper's
diagnostics (diagnose.py), the comparison of a run's arms from their logs (compare.py).
"""
import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from dar_minimal import QUERIES, DiT, flow_matching_loss, sample
from tools import fid
from tools.data import (SHAPE_NAMES, FileRows, Prefetch, held_out, load_cifar10, load_image_folder, load_latents,
                        make_shapes, rank_0_first)
from tools.encode_latents import decoder
from tools.grid import save_grid
from tools.compare import compare

PRESETS = {  # model, optimiser, length; evaluation: every eval_every steps on val_size images, grids every sample_every
    "quick": dict(depth=4, hidden_size=128, num_heads=4, patch_size=4, batch_size=64, lr=1e-3, ema_decay=0.999,
                  steps=400, eval_every=100, val_size=200, sample_every=400),
    "tiny": dict(depth=8, hidden_size=128, num_heads=4, patch_size=4, batch_size=64, lr=3e-4, ema_decay=0.999,
                 steps=400, eval_every=50, val_size=1000, sample_every=200),
    "S": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2, batch_size=256, lr=2e-4, ema_decay=0.9999,
              steps=50000, eval_every=5000, val_size=1000, sample_every=10000),
    "B": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2, batch_size=256, lr=1e-4, ema_decay=0.9999,
              steps=50000, eval_every=5000, val_size=1000, sample_every=10000),
}
VAL_T = [(i + 0.5) / 8 for i in range(8)]        # fixed grid of t for the validation loss


def parse_args(argv=None):
    """Command-line options; preset values fill in whatever is not given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="cifar10", choices=["cifar10", "folder", "latents", "shapes"])
    a("--data-root", default="data", help="cifar10: where torchvision keeps (or downloads) CIFAR-10")
    a("--data-dir", help="folder: an ImageFolder tree (class subfolders)")
    a("--val-dir", help="folder: optional validation ImageFolder tree (else a held-out part of --data-dir)")
    a("--data-path", help="latents: a directory of tools/encode_latents.py (read per batch), or a .pt/.npz of x, y")
    a("--vae", help="latents: the diffusers AutoencoderKL that decodes samples for grids and FID (default: the one "
                    "the latents directory names; none: no decoding)")
    a("--image-size", type=int, default=32)
    a("--preset", default="tiny", choices=list(PRESETS))
    for name in ("depth", "hidden-size", "num-heads", "patch-size", "batch-size", "steps"):
        a(f"--{name}", type=int, help="overrides the preset")
    a("--micro-batch", type=int, help="samples per forward and backward pass in each process (default: its whole part "
                                      "of the batch); smaller ones accumulate gradients: the same run in less memory")
    a("--lr", type=float, help="overrides the preset")
    a("--ema-decay", type=float, help="overrides the preset")
    a("--routing", default="residual,dar", help="residual, dar, or residual,dar to compare both")
    a("--dar-query", default="static_t", choices=QUERIES,
      help="static_t: e(t) a new zero-init projection of the t-embedding; static_t_embed: e(t) the t-embedding itself, "
           "the t-embedder's last layer zero-init (the paper's wording; only the DAR arm's init changes)")
    a("--dar-chunk", type=int, default=4)
    a("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up")
    a("--lr-schedule", default="constant", choices=["constant", "cosine"],
      help="after the warm-up: constant (as DiT and SiT), or cosine decay to lr/10 at --steps (as nanoGPT)")
    a("--grad-clip", type=float, default=1.0)
    a("--class-dropout", type=float, default=0.1, help="label dropout for classifier-free guidance")
    a("--t-sampling", default="uniform", choices=["uniform", "logit_normal"])
    a("--precision", default="fp32", choices=["fp32", "bf16"])
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on CUDA only)")
    a("--seed", type=int, default=0)
    a("--device", default="auto")
    a("--out", default="runs/default")
    a("--eval-every", type=int, help="overrides the preset (with --steps given: steps / 4)")
    a("--val-size", type=int, help="overrides the preset")
    a("--sample-every", type=int, help="sample grids at these evaluations and the last (default: the preset's)")
    a("--sample-steps", type=int, default=50)
    a("--sampler", default="euler", choices=["euler", "heun", "sde"])
    a("--cfg-scale", type=float, default=1.5)
    a("--fid-every", type=int, default=0, help="0: no FID (tools/fid.py: what it measures)")
    a("--fid-samples", type=int, default=5000, help="published CIFAR-10 FIDs use 50000")
    a("--fid-backend", default="pytorch-fid", choices=["pytorch-fid", "classifier"])
    a("--fid-weights", help="--fid-backend classifier: the classifier file (tools/classifier.py)")
    a("--ckpt-every", type=int, default=1000)
    a("--keep-every", type=int, default=0, help="also keep a copy ckpt_<step>.pt of every Nth step's checkpoint "
      "(a multiple of --ckpt-every; 0: none), e.g. to score a run's EMA weights later")
    a("--log-every", type=int, default=25)
    a("--resume", nargs="?", const="yes", choices=["yes", "auto"],
      help="continue each arm from its checkpoint in --out (an error where there is none); "
           "--resume auto: continue where a checkpoint exists, start the other arms new")
    a("--overwrite", action="store_true", help="delete the run already in --out and start over")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.steps is not None:     # a length of one's own: 4 evaluations, sample grids as often as the preset's
        preset.update(eval_every=max(1, args.steps // 4),
                      sample_every=max(1, args.steps * preset["sample_every"] // preset["steps"]))
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.arms = args.routing.split(",")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile is None:
        args.compile = args.device.startswith("cuda")                 # the speed path; eager on the CPU
    check_args(args)
    args.rank, args.world = 0, 1                           # this process and how many there are (see start_processes)
    return args


def check_args(args):
    """Every option's range and combination, checked before any data is loaded: ValueError naming what was expected."""
    def need(ok, message):
        if not ok:
            raise ValueError(message)
    for name in ("depth", "hidden_size", "num_heads", "patch_size", "batch_size", "steps", "image_size", "val_size",
                 "sample_steps", "eval_every", "sample_every", "ckpt_every", "log_every", "fid_samples",
                 "dar_chunk"):
        need(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("warmup", "fid_every", "keep_every"):
        need(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    need(args.micro_batch is None or (args.micro_batch >= 1 and args.batch_size % args.micro_batch == 0),
         f"--micro-batch must divide --batch-size ({args.batch_size}), got {args.micro_batch}")
    need(args.keep_every % args.ckpt_every == 0,
         f"--keep-every ({args.keep_every}) must be a multiple of --ckpt-every ({args.ckpt_every})")
    need(math.isfinite(args.lr) and args.lr > 0, f"--lr must be a finite positive number, got {args.lr}")
    need(math.isfinite(args.grad_clip) and args.grad_clip > 0, f"--grad-clip must be finite and > 0, got {args.grad_clip}")
    need(0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    need(0 <= args.class_dropout < 1, f"--class-dropout must be in [0, 1), got {args.class_dropout}")
    need(math.isfinite(args.cfg_scale), f"--cfg-scale must be finite, got {args.cfg_scale}")
    need(args.cfg_scale == 1 or args.class_dropout > 0,
         f"--cfg-scale {args.cfg_scale} needs the unconditional (null-class) model, which only label dropout trains: "
         "give --class-dropout > 0, or --cfg-scale 1 (no guidance)")
    need(not args.fid_every or args.fid_backend != "classifier" or os.path.isfile(args.fid_weights or ""),
         f"--fid-backend classifier needs --fid-weights FILE (made by tools/classifier.py), got {args.fid_weights!r}")
    need(args.vae is None or args.dataset == "latents", f"--vae decodes latents: it needs --dataset latents, "
         f"not --dataset {args.dataset}")
    need(args.hidden_size % args.num_heads == 0,
         f"--hidden-size ({args.hidden_size}) must be divisible by --num-heads ({args.num_heads})")
    need(args.arms and all(r in ("residual", "dar") for r in args.arms) and len(set(args.arms)) == len(args.arms),
         f"--routing must be residual, dar or residual,dar; got {args.routing!r}")
    need(not (args.resume and args.overwrite), "--resume continues the run in --out, --overwrite deletes it: not both")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    need(device is not None and device.type in ("cpu", "cuda", "mps"),
         f"--device must be auto, cpu, cuda, cuda:N or mps, got {args.device!r}")
    need(device.type != "cuda" or (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()),
         f"--device {args.device}: no such CUDA GPU here ({torch.cuda.device_count()} visible); use --device cpu")
    need(device.type != "mps" or torch.backends.mps.is_available(), "--device mps: MPS is not available here")


# ----------------------------------------------------------------------------------------------------
# Data: the whole training set as one in-memory tensor (uint8 for images), augmented on the device; the
# readers of each data set are in tools/data.py
# ----------------------------------------------------------------------------------------------------

def load_data(args):
    """dict(train_x, train_y, val_x, val_y, num_classes, class_names, images, decode): images are uint8, latents float
    (a latents directory: rows read per batch); decode: samples -> images in [-1, 1], or None."""
    decode = lambda x: x                                               # noqa: E731 (samples of images are images)
    if args.dataset == "cifar10":                        # under torchrun rank 0 downloads, the others then read
        x, y, vx, vy, classes = rank_0_first(load_cifar10, args.data_root)
    elif args.dataset == "folder":
        x, y, classes = load_image_folder(args.data_dir, args.image_size)
        if args.val_dir:
            vx, vy, val_classes = load_image_folder(args.val_dir, args.image_size)
            if val_classes != classes:
                raise ValueError(f"--val-dir must hold the same class folders as --data-dir (labels follow their "
                                 f"order): {args.val_dir!r} has {val_classes}, {args.data_dir!r} has {classes}")
        else:
            x, y, vx, vy = held_out(x, y, min(args.val_size, len(x) // 10), args.seed)
    elif args.dataset == "latents":
        x, y, meta = load_latents(args.data_path)
        x, y, vx, vy = held_out(x, y, min(args.val_size, len(x) // 10), args.seed)
        classes = meta.get("classes") or [str(c) for c in range(int(y.max()) + 1)]
        decode = rank_0_first(decoder, args.vae or meta.get("autoencoder"), args.device, args.vae is not None)
    else:
        x, y, classes = *make_shapes(10000, args.image_size, args.seed), SHAPE_NAMES
        vx, vy = make_shapes(1000, args.image_size, args.seed + 1)
    if len(x) == 0 or len(vx) == 0:
        raise ValueError(f"the {args.dataset} data set is empty")
    if max(int(y.max()), int(vy.max())) >= len(classes):      # checked once here, not at every training step
        raise ValueError(f"labels must be in [0, {len(classes)}) for the {len(classes)} classes of the data set, "
                         f"found {max(int(y.max()), int(vy.max()))}")
    keep = torch.randperm(len(vx), generator=torch.Generator().manual_seed(0))[:args.val_size]   # (folders: by class)
    data = dict(train_x=x, train_y=y, val_x=vx[keep], val_y=vy[keep], num_classes=len(classes), class_names=classes,
                images=x.dtype == torch.uint8, heldout_x=vx, heldout_y=vy, decode=decode)   # (all held-out data: FID)
    if args.device.startswith("cuda"):                  # the whole set lives on the GPU (rows read per batch: not)
        data.update({k: v.to(args.device) for k, v in data.items() if torch.is_tensor(v)})
    return data


def to_model_space(x, device):
    """uint8 images -> floats in [-1, 1] on the device (latents pass through)."""
    x = x.to(device, non_blocking=True)
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()


def epoch_order(n, seed, epoch):
    """The data order of one epoch, a function of (seed, epoch) alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


# ----------------------------------------------------------------------------------------------------
# Evaluation: validation loss per t, sample grids (tools/grid.py; FID: tools/fid.py)
# ----------------------------------------------------------------------------------------------------

def autocast(args):
    """bf16 autocast when asked for, else a no-op context."""
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16")


@torch.no_grad()
def validation_loss(model, data, args):
    """Flow-matching loss on the validation subset at each t of VAL_T, with fixed noise: (mean, per-t list)."""
    per_t = []
    for j, t in enumerate(VAL_T):
        total = 0.0
        for i in range(0, len(data["val_x"]), args.batch_size):
            x1 = to_model_space(data["val_x"][i:i + args.batch_size], args.device)
            y = data["val_y"][i:i + args.batch_size].to(args.device)
            g = torch.Generator(args.device).manual_seed(1_000_003 * (j + 1) + i)
            x0 = torch.randn(x1.shape, device=args.device, generator=g)
            with autocast(args):
                loss = flow_matching_loss(model, x1, y, t=torch.full((len(x1),), t, device=args.device), x0=x0,
                                          reduction="none")
            total += loss.sum().item()
        per_t.append(total / len(data["val_x"]))
    return sum(per_t) / len(per_t), per_t


@torch.no_grad()
def generate(model, n, args, seed=0, labels=None):
    """n samples from fixed noise (seed) and labels (0, 1, 2, ... by default) with the chosen sampler."""
    g = torch.Generator(args.device).manual_seed(seed)
    x0 = torch.randn(n, model.in_channels, model.input_size, model.input_size, device=args.device, generator=g)
    y = torch.arange(n, device=args.device) % model.num_classes if labels is None else labels
    if args.cfg_scale != 1 and model.class_dropout_prob == 0:
        raise ValueError(f"--cfg-scale {args.cfg_scale}: this model was trained without label dropout, so it has no "
                         "unconditional (null-class) prediction; use --cfg-scale 1")
    with autocast(args):
        return sample(model, x0, y, steps=args.sample_steps, method=args.sampler, cfg_scale=args.cfg_scale,
                      generator=g).float()


# ----------------------------------------------------------------------------------------------------
# Checkpoints and logs
# ----------------------------------------------------------------------------------------------------

CKPT_KEYS = {"model", "ema", "opt", "step", "config"}


def load_checkpoint(path, device="cpu"):
    """A checkpoint of train_arm, loaded with weights_only=True (tensors and plain containers: no code runs)."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"no checkpoint file {path!r}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path!r} is not a readable checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(ckpt, dict) or not CKPT_KEYS <= ckpt.keys():
        raise ValueError(f"{path!r} is not a checkpoint of train_cifar.py (expected a dict with {sorted(CKPT_KEYS)})")
    return ckpt


STREAM = ("seed", "batch_size", "lr", "lr_schedule", "warmup", "ema_decay", "grad_clip", "t_sampling", "precision",
          "class_dropout", "dataset", "image_size")          # the options that define a run's draws and updates


def stream_options(args, train_images=None):
    """What defines a run's stream of data and updates, kept in its checkpoints so that --resume continues that run:
    the STREAM options, the number of training images and, under a cosine schedule, --steps (it sets the decay of
    the steps already taken). --steps may grow under a constant schedule; evaluation and logging options may change."""
    stream = {k: getattr(args, k) for k in STREAM}
    if args.lr_schedule == "cosine":
        stream["steps"] = args.steps
    if train_images is not None:
        stream["train_images"] = train_images
    return stream


def check_stream(ckpt, ckpt_path, args, train_images=None):
    """ValueError naming every stream option in which the checkpoint and this command differ (with both values)."""
    old = ckpt.get("stream")
    if old is None:                                # a checkpoint of an older version: nothing recorded to compare
        print(f"note: {ckpt_path} records no stream options (an older version made it): they are not checked")
        return
    new = stream_options(args, train_images)
    diff = [k for k in new if k in old and old[k] != new[k]]
    if diff:
        said = ", ".join(f"--{k.replace('_', '-')} {old[k]} (now {new[k]})" if k != "train_images" else
                         f"{old[k]} training images (now {new[k]})" for k in diff)
        raise ValueError(f"--resume: {ckpt_path} belongs to a run with other settings of its data and updates: {said}. "
                         "Give the checkpoint's values to continue it, or start a new run (another --out, or "
                         "--overwrite to replace it)")


def prepare_out(args):
    """Checks --out before any data is loaded: an existing run is continued (--resume), deleted (--overwrite) or refused;
    --resume needs each arm's checkpoint (--resume auto: only where there is one) at a step <= --steps, made with
    the same stream options (check_stream)."""
    arm_files = {arm: [os.path.join(args.out, arm, f) for f in ("ckpt.pt", "log.jsonl")] for arm in args.arms}
    existing = [f for files in arm_files.values() for f in files if os.path.exists(f)]
    if args.resume:
        for arm, (ckpt_path, _) in arm_files.items():
            if not os.path.exists(ckpt_path):
                if args.resume == "auto":
                    continue
                raise ValueError(f"--resume: there is no checkpoint {ckpt_path!r} to continue from; check --out, "
                                 "use --resume auto to start the arms that have none, or leave out --resume")
            ckpt = load_checkpoint(ckpt_path)
            step = ckpt["step"]
            check_stream(ckpt, ckpt_path, args)
            if step > args.steps:
                raise ValueError(f"--resume: {ckpt_path!r} is at step {step}, beyond --steps {args.steps}; "
                                 f"give --steps {step} or more")
    elif existing and not args.overwrite:
        raise ValueError(f"--out {args.out!r} already holds a run ({existing[0]}): continue it with --resume, "
                         "delete it and start over with --overwrite, or choose another --out")
    elif args.overwrite:
        for path in [os.path.join(args.out, f) for f in (*args.arms, "compare.json", "compare.png")]:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        if existing:
            print(f"--overwrite: deleted the run in {args.out} ({', '.join(args.arms)})")
    try:
        for arm in args.arms:
            os.makedirs(os.path.join(args.out, arm), exist_ok=True)
            tempfile.TemporaryFile(dir=os.path.join(args.out, arm)).close()     # can we write there?
    except OSError as e:
        raise ValueError(f"cannot write to --out {args.out!r} ({e.strerror or e})") from None


def save_checkpoint(state, path):
    """torch.save to a temporary file, then an atomic rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def model_config(args, data, routing):
    """DiT keyword arguments of one arm; channels and size follow the data."""
    x = data["train_x"]
    if x.shape[-1] % args.patch_size != 0:
        raise ValueError(f"image size {x.shape[-1]} is not divisible by the patch size {args.patch_size}")
    return dict(input_size=x.shape[-1], patch_size=args.patch_size, in_channels=x.shape[1],
                hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads,
                class_dropout_prob=args.class_dropout, num_classes=data["num_classes"], routing=routing,
                dar_query=args.dar_query, dar_chunk=args.dar_chunk)


class Log:
    """Append-only JSONL log of one arm; on resume (keep_until: the checkpoint's step) later records are dropped, the
    log rewritten atomically. write=False (a process other than rank 0): neither read nor written."""

    def __init__(self, path, keep_until=None, write=True):
        self.path, self.enabled, self.records = path, write, []
        if write and keep_until is not None and os.path.exists(path):
            with open(path) as f:
                self.records = [r for r in map(json.loads, f) if r["step"] <= keep_until]
        if write:
            with open(path + ".tmp", "w") as f:                    # a kill here leaves the old log whole
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            os.replace(path + ".tmp", path)

    def write(self, **record):
        """Append one record (a dict with at least kind and step)."""
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------
# Training one arm
# ----------------------------------------------------------------------------------------------------

def evaluate(ema, data, args, step, log, arm_dir, fid_ref, train_seconds):
    """Validation loss (and samples, FID when due) of the EMA weights; one log record (rank 0), with the training time
    so far. Under torchrun every process draws its share of the FID samples, rank 0 alone does the rest."""
    quality = sample_quality(ema, fid_ref, args, data["decode"]) if fid_ref is not None and args.fid_every and \
        (step % args.fid_every == 0 or step == args.steps) else {}
    if args.rank:
        return quality
    val, per_t = validation_loss(ema, data, args)
    record = dict(kind="eval", step=step, val_loss=val, val_loss_per_t=per_t, train_seconds=train_seconds, **quality)
    if data["decode"] and (step % args.sample_every == 0 or step == args.steps):
        shown = grid_classes(data["num_classes"])
        y = shown.repeat(4).to(args.device)                            # 4 rows, one column per class shown
        save_grid(data["decode"](generate(ema, len(y), args, labels=y)), os.path.join(arm_dir, f"samples_{step:07d}.png"),
                  [data["class_names"][c] for c in shown])
    log.write(**record)
    return record


def grid_classes(num_classes, columns=10):
    """The classes a sample grid shows: all of them up to 10, else 10 spread evenly over the labels."""
    return torch.arange(num_classes) if num_classes <= columns else \
        torch.linspace(0, num_classes - 1, columns).round().long()


def sample_quality(model, fid_ref, args, decode, draw=0):
    """tools/fid.py's measures of args.fid_samples class-conditional samples of model, every class equally often, the
    noise fixed per chunk of 500 (and draw): each process draws, decodes and measures its share of the chunks, so N
    processes give what one gives."""
    labels = fid.sample_labels(args.fid_samples, model.num_classes)

    def samples():
        """This process's chunks of samples, decoded to images, with their labels."""
        for j, part in fid.chunks(args.fid_samples, args.rank, args.world):
            y = labels[part].to(args.device)
            yield decode(generate(model, len(y), args, seed=1 + fid.CHUNK * j + 1_000_000 * draw, labels=y)), y
    return fid.measure(*fid_ref, samples(), args.device)


class DistributedDiT(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that also answers the DiT's attributes (num_classes, ...) that flow_matching_loss reads."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class Stopped(Exception):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM after writing its checkpoint: the exit code is 128 + signum."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While active, the first SIGINT or SIGTERM is only recorded (self.signum): the training loop finishes its step,
    writes a checkpoint and raises Stopped. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self, quiet=False):
        self.signum, self.previous, self.quiet = 0, {}, quiet            # quiet: a process other than rank 0

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        """The signal handler: record the first signal, raise KeyboardInterrupt on a second Ctrl-C."""
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            if not self.quiet:
                print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                      "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self, args):
        """The signal to stop on, the same in every process (under torchrun, any process's signal stops all; a
        collective, so the training loop asks only at log lines, all processes at the same steps)."""
        if args.world == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


def resume_hint(args):
    """How to continue the run in --out: --resume, or --resume auto where an arm has no checkpoint yet."""
    started = all(os.path.exists(os.path.join(args.out, arm, "ckpt.pt")) for arm in args.arms)
    return "--resume" if started else "--resume auto"


def learning_rate(step, args):
    """The learning rate of a step: linear warm-up over --warmup steps, then constant or cosine decay to lr/10."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_schedule == "constant":
        return args.lr
    progress = (step - args.warmup) / max(1, args.steps - 1 - args.warmup)            # 0 .. 1 at the last step
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def step_flips(B, step, args):
    """The step's horizontal flips of the whole batch, drawn on the host (they choose which rows to read), and the
    generator after them."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    return torch.rand(B, generator=g) < 0.5, g


def step_draws(B, shape, step, args):
    """The other random draws of one training step for the whole batch, in a fixed order: t, noise, label drops (on the
    CPU from the flips' generator, after them). Each process and each micro-batch takes its part of every draw, so
    N x B/N sees what 1 x B sees, on any device."""
    g = step_flips(B, step, args)[1] if args.device == "cpu" else \
        torch.Generator(args.device).manual_seed(args.seed * 1_000_003 + step)
    t = torch.rand(B, device=args.device, generator=g) if args.t_sampling == "uniform" else \
        torch.sigmoid(torch.randn(B, device=args.device, generator=g))              # as flow_matching_loss draws t
    x0 = torch.randn((B, *shape), device=args.device, generator=g)
    return t, x0, torch.rand(B, device=args.device, generator=g) < args.class_dropout


def batches(data, args):
    """A function step -> (x1, y): this process's part of the step's batch on the device, in model space, mirrored
    where the step's flips say: images flipped; latents replaced by their mirror images' latents where the directory
    stores them (tools/encode_latents.py --mirror), else never mirrored (latents are not mirror-equivariant). Rows
    read from a file come from a background thread, read while the step before trains (pinned memory on CUDA)."""
    x, n, B = data["train_x"], len(data["train_x"]), args.batch_size
    mine = slice(args.rank * (B // args.world), (args.rank + 1) * (B // args.world))
    on_file, orders = isinstance(x, FileRows), {}
    # On CUDA nothing a step copies to the GPU waits for it: host tensors are pinned, indices of data on the GPU too
    pin = (lambda t: t.pin_memory()) if args.device.startswith("cuda") else (lambda t: t)
    labels = data["train_y"].cpu() if on_file else data["train_y"]

    def read(step):
        """(rows, labels, flips) of the step, this process's part."""
        epoch, i = divmod(step, max(1, n // B))
        if epoch not in orders:                                    # one epoch's order at a time, beside the data
            orders.clear()
            orders[epoch] = epoch_order(n, args.seed, epoch).to("cpu" if on_file else x.device)
        idx, flip = orders[epoch][i * B:(i + 1) * B][mine], pin(step_flips(B, step, args)[0][mine])
        if on_file:
            return pin(x.read(idx, flip if x.mirrored else None)), pin(labels[idx]), flip
        return x[idx], labels[idx], flip
    read = Prefetch(read) if on_file else read

    def batch(step):
        """This process's part of the step's batch: (x1, y) on the device."""
        rows, y, flip = read(step)
        x1 = to_model_space(rows, args.device)
        if data["images"]:                                          # random horizontal flip
            x1 = torch.where(flip.to(args.device, non_blocking=True)[:, None, None, None], x1.flip(-1), x1)
        return x1, y.to(args.device, non_blocking=True)
    batch.close = getattr(read, "close", lambda: None)
    return batch


def train_arm(args, data, routing, arm_dir, fid_ref=None, stop=None):
    """Trains one arm (routing) for args.steps steps, evaluating, logging and checkpointing; returns its log records.
    stop (StopSignals): after a signal, the step in progress ends with a checkpoint and Stopped is raised."""
    os.makedirs(arm_dir, exist_ok=True)
    config = model_config(args, data, routing)
    torch.manual_seed(args.seed)                                   # same init for both arms: the router comes last
    model = DiT(**config).to(args.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0,
                            fused=args.device.startswith("cuda") or None)       # fused: one kernel on CUDA
    ckpt_path, start, spent = os.path.join(arm_dir, "ckpt.pt"), 0, dict(train=0.0, eval=0.0)
    stream, pending = stream_options(args, len(data["train_x"])), []
    resume = args.resume and os.path.exists(ckpt_path)              # prepare_out has checked that it may
    if resume:
        ckpt = load_checkpoint(ckpt_path, args.device)
        check_stream(ckpt, ckpt_path, args, len(data["train_x"]))
        if ckpt["config"] != config:
            diff = {k: (ckpt["config"].get(k), v) for k, v in config.items() if ckpt["config"].get(k) != v}
            raise ValueError(f"cannot resume {ckpt_path}: it was made with another model configuration "
                             f"(checkpoint vs now: {diff})")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        for group in ckpt["opt"]["param_groups"]:                  # fused or not as here, whatever the checkpoint's
            group.update(fused=opt.defaults["fused"], foreach=opt.defaults["foreach"])
        opt.load_state_dict(ckpt["opt"])
        start, spent = ckpt["step"], ckpt.get("seconds", dict(train=0.0, eval=0.0))   # training and evaluation so far
        pending = list(ckpt.get("pending", torch.zeros(0)).to(args.device))   # losses not yet in a log line
        del ckpt                                                   # not a second copy of everything while training
        if start == args.steps:
            print(f"[{routing}] {ckpt_path} is already at step {start}: nothing to train")
            return Log(os.path.join(arm_dir, "log.jsonl"), keep_until=start, write=args.rank == 0).records
        print(f"[{routing}] resumed from {ckpt_path} at step {start}")
    main_process = args.rank == 0                                  # logs, evaluations and checkpoints
    log = Log(os.path.join(arm_dir, "log.jsonl"), keep_until=start if resume else None, write=main_process)
    if main_process:
        with open(os.path.join(arm_dir, "config.json"), "w") as f:
            json.dump(dict(model=config, args=vars(args), val_t=VAL_T, params=sum(p.numel() for p in model.parameters())),
                      f, indent=1)
    net = DistributedDiT(model) if args.world > 1 else model       # gradients averaged over the processes
    step_fn = torch.compile(net) if args.compile else net
    B, part = args.batch_size, args.batch_size // args.world       # the batch, and this process's part of it
    mine, micro = slice(args.rank * part, (args.rank + 1) * part), args.micro_batch or part
    batch = batches(data, args)
    eval_time, t_start, last = 0.0, time.time(), (start, time.time())
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=routing, dynamic_ncols=True,
               disable=None if main_process else True)

    def pending_losses():
        """The losses of the steps since the last log line, each the mean over every process's part of the batch."""
        losses = torch.stack(pending).float() if pending else torch.zeros(0, device=args.device)
        if args.world > 1:
            torch.distributed.all_reduce(losses)
            losses /= args.world
        return losses.cpu()

    def check(step):
        """Mean of the losses of the steps since the last log line (one sync); stop on a non-finite one."""
        if not pending:
            return None
        losses = pending_losses()
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            raise FloatingPointError(f"[{routing}] non-finite loss at step {step - len(pending) + int(bad[0]) + 1}; "
                                     f"stopped. The last good checkpoint is {ckpt_path} (if one was written).")
        return losses.mean().item()

    for step in range(start, args.steps):
        x1, y = batch(step)                                                           # this process's part
        t, x0, drop = (d[mine] for d in step_draws(B, x1.shape[1:], step, args))      # drawn for the whole batch
        lr = learning_rate(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        opt.zero_grad(set_to_none=True)
        losses = []
        try:
            for k in range(0, part, micro):            # micro-batches: their gradients add up to the whole part's
                mb, last_mb = slice(k, k + micro), k + micro == part
                with contextlib.nullcontext() if last_mb or args.world == 1 else net.no_sync():   # DDP: sync once
                    with autocast(args):
                        loss = flow_matching_loss(step_fn, x1[mb], y[mb], t=t[mb], x0=x0[mb], drop=drop[mb])
                    (loss * (micro / part)).backward()
                losses.append(loss.detach())
        except torch.cuda.OutOfMemoryError:
            raise ValueError(f"CUDA out of memory in a training step of {micro} samples per process (--batch-size {B}"
                             f" over {args.world} process(es)): give --micro-batch {max(1, micro // 2)} or less (it "
                             "accumulates gradients: the same run in less memory)") from None
        loss = torch.stack(losses).mean()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))                          # EMA with a short warm-up
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        pending.append(loss.detach())
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            mean_loss = check(done)
            pending.clear()
            rate = (done - last[0]) / max(time.time() - last[1], 1e-9)
            last = (done, time.time())
            log.write(kind="train", step=done, loss=mean_loss, lr=lr, steps_per_s=rate, images_per_s=rate * B)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.1e}", it_s=f"{rate:.2f}", img_s=f"{rate * B:.0f}")
        agree_now = args.world == 1 or done % args.log_every == 0          # torchrun: agree at log lines, no per-step sync
        signum = stop.agreed(args) if stop and agree_now and done < args.steps else 0   # (a finished arm finishes)
        evaluate_now = done % args.eval_every == 0 or done == args.steps
        save_now = done % args.ckpt_every == 0 or done == args.steps or signum
        if evaluate_now or save_now:
            check(done)                                            # never evaluate or save a non-finite model
        if evaluate_now:                                           # every process: its share of the FID samples
            t_eval = time.time()
            record = evaluate(ema, data, args, done, log, arm_dir, fid_ref,
                              train_seconds=spent["train"] + time.time() - t_start - eval_time)
            eval_time += time.time() - t_eval
        if main_process and evaluate_now:
            tqdm.write(f"[{routing}] step {done}: val loss {record['val_loss']:.4f}"
                       + (f", FID {record['fid']:.2f}" if "fid" in record else "")
                       + (f", sample accuracy {record['sample_accuracy']:.3f}" if "sample_accuracy" in record else ""))
            last = (done, time.time())                                                 # keep eval out of the rates
        if save_now:
            unlogged = pending_losses()                            # every process takes part in the mean
        if main_process and save_now:
            save_checkpoint(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=done,
                                 config=config, seed=args.seed, stream=stream, pending=unlogged,
                                 seconds=dict(train=spent["train"] + time.time() - t_start - eval_time,
                                              eval=spent["eval"] + eval_time),
                                 data_position=dict(zip(("epoch", "index_in_epoch"),
                                                        divmod(done, max(1, len(data["train_x"]) // B))))), ckpt_path)
            if args.keep_every and done % args.keep_every == 0:                     # a copy, also atomic
                kept = os.path.join(arm_dir, f"ckpt_{done:07d}.pt")
                shutil.copy(ckpt_path, kept + ".tmp")
                os.replace(kept + ".tmp", kept)
        bar.update(1)
        if signum:
            bar.close()
            batch.close()
            raise Stopped(f"stopped at step {done}; checkpoint written to {ckpt_path}; continue with the same "
                          f"command and {resume_hint(args)}", signum)
    bar.close()
    batch.close()
    log.write(kind="done", step=args.steps, train_seconds=spent["train"] + time.time() - t_start - eval_time,
              eval_seconds=spent["eval"] + eval_time, device=machine(), resumed_from=start)    # totals, all segments
    return log.records


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

def machine():
    """A short description of the machine a run is on."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (torch {torch.__version__})"


def start_processes(args):
    """Under torchrun: joins the process group (NCCL on CUDA, gloo on the CPU), one GPU per process; rank 0 prints."""
    args.rank, args.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.world == 1:
        return
    if args.batch_size % args.world:
        raise ValueError(f"--batch-size (the global batch) must be divisible by the {args.world} processes, "
                         f"got {args.batch_size}")
    if args.micro_batch and (args.batch_size // args.world) % args.micro_batch:
        raise ValueError(f"--micro-batch ({args.micro_batch}) must divide each process's part of the batch "
                         f"({args.batch_size} / {args.world} = {args.batch_size // args.world})")
    cuda = args.device.startswith("cuda")
    if cuda:
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(args.device)
    # The longest wait in a collective: the other processes wait for rank 0 while it downloads CIFAR-10, validates,
    # draws a sample grid or writes a checkpoint (FID samples are shared out, not waited for); an hour covers them.
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1),
                                         device_id=torch.device(args.device) if cuda else None)
    if args.rank:
        sys.stdout = open(os.devnull, "w")


def main(argv=None):
    """Parses options, trains each arm and compares them; under torchrun every exit leaves the process group."""
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        start_processes(args)
        return train(args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(args):
    """Trains each arm of args (this process's part) and compares them."""
    if args.rank == 0:
        prepare_out(args)
    if args.world > 1:
        torch.distributed.barrier()                    # the others wait for rank 0's check of --out
    data = load_data(args)
    print(f"{args.dataset}: {len(data['train_x'])} train, {len(data['val_x'])} val, "
          f"{tuple(data['train_x'].shape[1:])}, {data['num_classes']} classes; device {args.device}")
    fid_ref = fid.setup(data, args) if args.fid_every and data["decode"] else None     # every process
    arms = {}
    with StopSignals(quiet=args.rank > 0) as stop:     # Ctrl-C or SIGTERM: finish the step, checkpoint, exit
        for routing in args.arms:
            signum = stop.agreed(args)                 # stopped just as the previous arm finished
            if signum:
                raise Stopped(f"stopped before the {routing} arm; continue with the same command and "
                              f"{resume_hint(args)}", signum)
            t0 = time.time()
            arms[routing] = train_arm(args, data, routing, os.path.join(args.out, routing), fid_ref, stop)
            print(f"[{routing}] done in {time.time() - t0:.0f} s")
    if len(arms) == 2 and args.rank == 0:
        return compare(arms, args.out, VAL_T)
    return arms


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FloatingPointError) as e:           # a user mistake or a stopped run: one line, exit code 1
        sys.exit(f"error: {e}")
    except Stopped as e:                                    # a signal: checkpoint written, 130 (SIGINT) or 143 (SIGTERM)
        if int(os.environ.get("RANK", 0)) == 0:
            print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:                               # Ctrl-C before training, or a second one during it
        print("stopped at once (Ctrl-C); the last checkpoint written, if any, is intact", file=sys.stderr)
        sys.exit(130)
