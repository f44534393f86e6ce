"""
fid.py: sample quality for train_cifar.py's --fid-every, with one of two feature networks (--fid-backend):
  pytorch-fid  the TF-Inception network of published FIDs (the optional pytorch-fid package; its weights are
               downloaded on first use), against the statistics of --fid-samples training images;
  classifier   a small CNN trained on the data set's own training images by tools/classifier.py (offline, a few MB,
               --fid-weights FILE), against the held-out images: the Frechet distance in its penultimate features
               and its accuracy on the samples (the share recognised as the class they were drawn for).
Either number compares only with runs measured the same way (data, backend, sample count); only pytorch-fid at
50,000 samples compares with published CIFAR-10 FIDs.
"""
import hashlib
import os

import torch
import torch.nn as nn

from tools.data import rank_0_first


class Classifier(nn.Module):
    """A small CNN for images in [-1, 1]: three stages of two 3x3 convolutions (BatchNorm, ReLU), pooled features, a
    linear head."""

    def __init__(self, num_classes=10, in_channels=3, width=32):
        super().__init__()
        conv = lambda i, o: [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
        w = width
        self.features = nn.Sequential(*conv(in_channels, w), *conv(w, w), nn.MaxPool2d(2),
                                      *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
                                      *conv(2 * w, 4 * w), *conv(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes)
        self.config = dict(num_classes=num_classes, in_channels=in_channels, width=width)

    def forward(self, x):
        """Class logits of images x (B, C, H, W) in [-1, 1]."""
        return self.head(self.features(x))


def sha256(path):
    """The SHA-256 of a file, in hex."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_classifier(path, device="cpu"):
    """A classifier written by tools/classifier.py, in eval mode; ValueError in one line when it cannot be read."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"--fid-backend classifier needs --fid-weights FILE, a classifier made by "
                         f"tools/classifier.py; got {path!r}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        net = Classifier(**ckpt["config"])
        net.load_state_dict(ckpt["model"])
    except Exception as e:
        raise ValueError(f"{path!r} is not a classifier of tools/classifier.py ({type(e).__name__})") from None
    return net.eval().to(device)


def load_inception(device):
    """pytorch-fid's Inception (2048-d pool features), or None with one line when the package or weights are missing."""
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError:
        print("FID skipped: it needs the optional package pytorch-fid (pip install pytorch-fid)")
        return None
    try:                                                  # resizes to 299 and rescales [0, 1] inputs itself
        return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(device)
    except Exception as e:
        print(f"FID skipped: pytorch-fid's Inception weights could not be loaded ({type(e).__name__}: {e})")
        return None


@torch.no_grad()
def features(net, images, device, batch=200):
    """(features (N, D) float64, predicted classes (N,) or None) of images in [-1, 1]: the classifier's penultimate
    features and its predictions, or the Inception's pool features."""
    feats, preds = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device).float().clamp(-1, 1)
        if isinstance(net, Classifier):
            f = net.features(x)
            preds.append(net.head(f).argmax(1).cpu())
        else:
            f = net((x + 1) / 2)[0].flatten(1)
        feats.append(f.double().cpu())
    return torch.cat(feats), torch.cat(preds) if preds else None


def feature_stats(f):
    """Mean and covariance of (N, D) features."""
    return f.mean(0), torch.cov(f.T)


CHUNK = 500       # samples and reference images go through in chunks: drawn (seeded per chunk), decoded, measured


def chunks(n, rank=0, world=1):
    """(j, slice) of the chunks of n items that process `rank` of `world` handles: j = rank, rank + world, ..."""
    return [(j, slice(a, min(a + CHUNK, n))) for j, a in enumerate(range(0, n, CHUNK)) if j % world == rank]


def sample_labels(n, num_classes):
    """The labels of n class-conditional samples: 0, 1, 2, ... in turn, so every class equally often (n a multiple of
    num_classes; else the first n % num_classes once more)."""
    return torch.arange(n) % num_classes


@torch.no_grad()
def moments(net, batches, device):
    """Sums over a stream of (images in [-1, 1], labels or None) batches, added up over the processes under torchrun:
    dict(n, sum (D,), outer (D, D), correct) in float64. Only sums are kept, never the images or their features."""
    D = net.head.in_features if isinstance(net, Classifier) else 2048           # (a process may have no chunk)
    total = dict(n=torch.zeros((), dtype=torch.float64), sum=torch.zeros(D, dtype=torch.float64),
                 outer=torch.zeros(D, D, dtype=torch.float64), correct=torch.zeros((), dtype=torch.float64))
    for x, y in batches:
        f, pred = features(net, x, device)
        total["n"] += len(f)
        total["sum"] += f.sum(0)
        total["outer"] += f.T @ f
        if pred is not None and y is not None:
            total["correct"] += (pred == y.cpu()).sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        total = {k: all_sum(v, device) for k, v in total.items()}
    return total


def all_sum(x, device):
    """x summed over the processes (on the device: NCCL reduces GPU tensors only), back on the CPU."""
    x = x.to(device)
    torch.distributed.all_reduce(x)
    return x.cpu()


def moment_stats(m):
    """Mean and covariance (unbiased, as torch.cov) from the sums of moments."""
    mu = m["sum"] / m["n"]
    return mu, (m["outer"] - m["n"] * torch.outer(mu, mu)) / (m["n"] - 1)


def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), the trace term from the eigenvalues of C1^(1/2) C2 C1^(1/2)."""
    w, V = torch.linalg.eigh(cov1)
    sqrt1 = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(sqrt1 @ cov2 @ sqrt1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


def setup(data, args):
    """(net, mu, cov) of --fid-backend, the reference statistics cached in --out (named in the terminal and in each
    arm's config.json): --fid-samples random training images (pytorch-fid) or held-out images (classifier); latents
    are decoded by the autoencoder, a chunk at a time (the built-in reference of latents: decoded training latents, not
    ADM's reference batch). Under torchrun every process takes part (rank 0 loads the weights first and writes the
    cache). None when pytorch-fid or its weights are missing."""
    if args.fid_backend == "classifier":
        net = load_classifier(args.fid_weights, args.device)
        x, tag = data["heldout_x"], f"classifier_{sha256(args.fid_weights)[:12]}"
    else:
        net, x, tag = rank_0_first(load_inception, args.device), data["train_x"], "pytorch-fid"   # rank 0 downloads
    if net is None:
        return None
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:args.fid_samples]
    digest = hashlib.sha256()                                           # the cache names its images (or latents)
    for _, part in chunks(len(pick)):
        digest.update(x[pick[part].to(x.device)].cpu().numpy().tobytes())
    args.fid_reference = os.path.join(args.out, f"fid_ref_{tag}_{args.dataset}_{len(pick)}_{digest.hexdigest()[:12]}.pt")
    print(f"FID ({args.fid_backend}) against the statistics of {len(pick)} images in {args.fid_reference}")
    cached = torch.tensor([float(os.path.exists(args.fid_reference))], device=args.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(cached, 0)                                     # rank 0's answer for all
    if cached.item():
        return net, *torch.load(args.fid_reference, weights_only=True)
    to_images = (lambda r: r.float() / 127.5 - 1) if x.dtype == torch.uint8 else data["decode"]

    def batches():
        """This process's chunks of the reference, as images."""
        for _, part in chunks(len(pick), args.rank, args.world):
            yield to_images(x[pick[part].to(x.device)]), None
    mu, cov = moment_stats(moments(net, batches(), args.device))
    if args.rank == 0:
        torch.save((mu, cov), args.fid_reference + ".tmp")                 # written atomically
        os.replace(args.fid_reference + ".tmp", args.fid_reference)
    return net, mu, cov


def measure(net, mu, cov, batches, device):
    """Sample quality of class-conditional samples, a stream of (images in [-1, 1], the labels they were drawn for):
    {"fid": the Frechet distance to the reference}, with the classifier also {"sample_accuracy": the share classified
    as their label}. Under torchrun each process passes its share."""
    m = moments(net, batches, device)
    out = dict(fid=frechet_distance(*moment_stats(m), mu, cov))
    if isinstance(net, Classifier):
        out["sample_accuracy"] = (m["correct"] / m["n"]).item()
    return out


def measures(net, mu, cov, images, labels, device):
    """measure() of images held in memory (one process)."""
    return measure(net, mu, cov, ((images[p], labels[p]) for _, p in chunks(len(images))), device)
