"""
data.py: the data sets train_cifar.py reads, each as one tensor of images (uint8) or latents (float) and labels:
an ImageFolder tree, a latents file or a latents directory read per batch (tools/encode_latents.py), and the built-in
shapes of the quick start (--dataset shapes).
"""
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def rank_0_first(fn, *args):
    """fn(*args) in rank 0 first and then, after a barrier, in the other processes (under torchrun): what rank 0
    downloads or writes into a shared path, they read, instead of all of them writing it at once."""
    dist = torch.distributed
    many = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if many and dist.get_rank() > 0:
        dist.barrier()
    out = fn(*args)
    if many and dist.get_rank() == 0:
        dist.barrier()
    return out


class FileRows:
    """Rows `index` of an (N, C, H, W) .npy file, read from the file when asked for: rows[i] (i: a tensor of
    positions) reads those rows (one positional read each, in file order, through the page cache) into a float
    tensor; mirrored: a file of the mirror images' latents in the same rows (tools/encode_latents.py --mirror), which
    read(i, flip) reads where flip is True. Not a memory map: a mapping counts every page the kernel maps around a
    touched row as the process's own resident memory, which grew to the whole file's size in 300 steps
    (results/latents/mapped/)."""

    def __init__(self, path, index, mirrored=None):
        header = np.load(path, mmap_mode="r")                         # shape, dtype and where the rows begin
        self.path, self.index, self.file_dtype, self.offset = path, index, header.dtype, header.offset
        self.row_bytes = header.dtype.itemsize * int(np.prod(header.shape[1:]))
        self.shape, self.dtype, self.device = (len(index), *header.shape[1:]), torch.float32, torch.device("cpu")
        self.mirrored = mirrored

    def __len__(self):
        """The number of rows."""
        return len(self.index)

    def __getitem__(self, i):
        """The rows at positions i (a tensor of positions), read now, as float32."""
        return self.read(i)

    def read(self, i, flip=None):
        """The rows at positions i, read now as float32; where flip (booleans like i) is True, the mirror image's row."""
        rows, chunks = self.index[i], [b""] * len(i)
        flip = torch.zeros(len(rows), dtype=torch.bool) if flip is None else flip.cpu()
        for path, which in ((self.path, ~flip), (self.mirrored, flip)):
            k = which.nonzero().flatten()
            if len(k):
                with open(path, "rb") as f:
                    for j in k[rows[k].argsort()].tolist():              # in file order: shorter seeks
                        f.seek(self.offset + int(rows[j]) * self.row_bytes)
                        chunks[j] = f.read(self.row_bytes)
        x = np.frombuffer(b"".join(chunks), self.file_dtype).reshape(len(rows), *self.shape[1:])
        return torch.from_numpy(x.astype(np.float32))

    def rows(self, i):
        """A subset of these rows, still unread."""
        return FileRows(self.path, self.index[i], self.mirrored)


class Prefetch:
    """read(step) for step after step, each read in a background thread while the step before it trains."""

    def __init__(self, read):
        self.read, self.pool, self.ahead = read, ThreadPoolExecutor(1), None

    def __call__(self, step):
        """What read(step) returns (read ahead, when the last call was for step - 1); starts reading step + 1."""
        rows = self.ahead[1].result() if self.ahead and self.ahead[0] == step else self.read(step)
        self.ahead = (step + 1, self.pool.submit(self.read, step + 1))
        return rows

    def close(self):
        """Ends the thread (after the read in progress)."""
        self.pool.shutdown(cancel_futures=True)


def held_out(x, y, n_val, seed):
    """Split off a deterministic validation part of n_val items (of FileRows: only that part is read)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 12345))
    train = x.rows(perm[n_val:]) if isinstance(x, FileRows) else x[perm[n_val:]]
    return train, y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]


def load_cifar10(root):
    """CIFAR-10 through torchvision (downloaded into root when missing): train and test images, labels, class names."""
    from torchvision.datasets import CIFAR10
    try:
        train, test = (CIFAR10(root, train=s, download=True) for s in (True, False))
    except Exception as e:
        raise ValueError(f"CIFAR-10 is not in --data-root {root!r} and could not be downloaded ({e}). "
                         "Alternatives: --dataset folder --data-dir DIR (e.g. the CIFAR-10 JPEG copy), "
                         "--dataset shapes (built in, offline), or --dataset latents --data-path FILE.") from None
    to_t = lambda d: torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous()
    return to_t(train), torch.tensor(train.targets), to_t(test), torch.tensor(test.targets), train.classes


def load_image_folder(path, size):
    """An ImageFolder tree resized and centre-cropped to size, as one uint8 tensor and its labels."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    if not path or not os.path.isdir(path):
        raise ValueError(f"--data-dir/--val-dir must be an existing ImageFolder directory, got {path!r}")
    try:
        ds = ImageFolder(path, transform=T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()]))
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f"no images found in {path!r} (expected class subfolders of images): {e}") from None
    loader = torch.utils.data.DataLoader(ds, batch_size=500, num_workers=min(8, os.cpu_count() or 1))
    try:
        xs, ys = zip(*loader)
    except Exception:                                  # find the unreadable file (worker errors do not name it)
        for file, _ in ds.samples:
            try:
                ds.loader(file)
            except Exception as e:
                raise ValueError(f"cannot read image {file!r} ({type(e).__name__}: {e})") from None
        raise
    return torch.cat(xs), torch.cat(ys), ds.classes


def load_latents(path):
    """x (N, C, H, W) float, y (N,) labels and what made them (the directory's latents.json, else {}): a .pt or .npz
    file read whole, or a directory of tools/encode_latents.py read per batch (x: FileRows); checked: shapes, integer
    labels >= 0, and (files) finite x."""
    expected = ("--data-path must be a directory of tools/encode_latents.py (latents.npy, labels.npy) or a .pt or "
                ".npz file holding x (N, C, H, W) and integer labels y (N,)")
    if path and os.path.isdir(path):
        return load_latent_dir(path, expected)
    if not path or not os.path.isfile(path):
        raise ValueError(f"{expected}; got {path!r}")
    try:
        if path.endswith(".npz"):
            import numpy as np
            with np.load(path) as z:
                x, y = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
        else:
            z = torch.load(path, map_location="cpu", weights_only=True)
            x, y = torch.as_tensor(z["x"]), torch.as_tensor(z["y"])
    except Exception as e:
        raise ValueError(f"{expected}; could not read x and y from {path!r} ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if x.ndim != 4 or y.shape != (len(x),) or y.is_floating_point() or y.is_complex() or len(x) < 2:
        raise ValueError(f"{expected}; {path!r} has x {tuple(x.shape)} and y {tuple(y.shape)} {y.dtype}")
    x, y = x.float(), y.long()
    if not torch.isfinite(x).all():
        raise ValueError(f"{path!r}: x holds {int((~torch.isfinite(x)).sum())} NaN or infinite values")
    if (y < 0).any():
        raise ValueError(f"{path!r}: labels y must be >= 0, found {int(y.min())}")
    return x, y, {}


def load_latent_dir(path, expected):
    """A latents directory: latents.npy as FileRows (nothing read yet: its values are not checked here, a non-finite
    loss stops training), labels.npy read, latents.json if present (an unfinished encoding is refused)."""
    meta = {}
    if os.path.isfile(os.path.join(path, "latents.json")):
        with open(os.path.join(path, "latents.json")) as f:
            meta = json.load(f)
        if meta.get("done", meta.get("count")) != meta.get("count"):
            raise ValueError(f"{path!r} is unfinished ({meta['done']} of {meta['count']} images encoded): run "
                             "tools/encode_latents.py again with the same options to complete it")
    try:
        x = np.load(os.path.join(path, "latents.npy"), mmap_mode="r")           # the header only: nothing is read
        y = torch.from_numpy(np.load(os.path.join(path, "labels.npy")))
    except Exception as e:
        raise ValueError(f"{expected}; could not read {path!r} ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if x.ndim != 4 or y.shape != (len(x),) or y.is_floating_point() or y.is_complex() or len(x) < 2 or \
            x.dtype.kind != "f" or not x.flags.c_contiguous:
        raise ValueError(f"{expected}; {path!r} has latents {x.shape} {x.dtype} and labels {tuple(y.shape)} {y.dtype}")
    if (y < 0).any():
        raise ValueError(f"{path!r}: labels must be >= 0, found {int(y.min())}")
    mirrored = os.path.join(path, "latents_mirrored.npy") if meta.get("mirror") else None
    if mirrored and (not os.path.isfile(mirrored) or np.load(mirrored, mmap_mode="r").shape != x.shape):
        raise ValueError(f"{path!r} records mirrored latents, but latents_mirrored.npy is missing or not of the shape "
                         f"{x.shape}")
    return FileRows(os.path.join(path, "latents.npy"), torch.arange(len(x)), mirrored), y.long(), meta


SHAPE_NAMES = ["disc", "ring", "square", "frame", "plus", "x", "triangle", "bar", "two dots", "crescent"]


def make_shapes(n, size, seed):
    """n images (uint8, N x 3 x size x size) of 10 classes of shapes, deterministic from seed: one shaded object of its
    class's shape and colour, near the centre, slightly moved, scaled and rotated, on a plain dark background. The
    classes differ in their coarse outline (filled or hollow, round or square, lines, two parts), so that a few minutes
    of training on a CPU draw recognisable samples."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randperm(n, generator=g) % 10
    u = lambda *s: torch.rand(*s, generator=g)
    c = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    cx, cy, r = (u(n, 1, 1) - 0.5) * 0.16, (u(n, 1, 1) - 0.5) * 0.16, 0.62 + 0.08 * u(n, 1, 1)
    a = (u(n, 1, 1) - 0.5) * math.pi / 9                                       # rotation, +-10 degrees
    dx = (torch.cos(a) * (xx - cx) + torch.sin(a) * (yy - cy)) / r
    dy = (-torch.sin(a) * (xx - cx) + torch.cos(a) * (yy - cy)) / r
    rho, box = (dx ** 2 + dy ** 2).sqrt(), torch.maximum(dx.abs(), dy.abs())
    masks = [rho < 1,                                                           # disc
             (rho < 1) & (rho > 0.55),                                          # ring
             box < 0.8,                                                         # square
             (box < 0.85) & (box > 0.45),                                       # frame
             ((dx.abs() < 0.28) | (dy.abs() < 0.28)) & (box < 1),               # plus
             (((dx - dy).abs() < 0.38) | ((dx + dy).abs() < 0.38)) & (box < 0.85),   # x
             (dy < 0.7) & (dx.abs() < (dy + 1) / 1.7),                          # triangle
             (dy.abs() < 0.3) & (dx.abs() < 1),                                 # bar
             ((dx.abs() - 0.5) ** 2 + dy ** 2 < 0.16),                          # two dots
             (rho < 1) & ((dx - 0.45) ** 2 + (dy + 0.2) ** 2 > 0.6)]            # crescent
    mask = torch.stack(masks, 1)[torch.arange(n), y]                            # (n, size, size)
    palette = torch.tensor([[.9, .2, .2], [.2, .75, .2], [.2, .35, .95], [.95, .8, .1], [.8, .25, .85],
                            [.1, .8, .8], [.95, .55, .1], [.95, .95, .95], [.95, .45, .65], [.45, .95, .55]])
    fg = (palette[y] + 0.2 * (u(n, 3) - 0.5)).clamp(0, 1)[:, :, None, None]
    fg = fg * (1 - 0.25 * (dx + dy)[:, None] / 2).clamp(0.6, 1.4)              # lit from the top left
    img = torch.where(mask[:, None], fg, 0.25 * u(n, 3, 1, 1))                  # on a dark background of any colour
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y
