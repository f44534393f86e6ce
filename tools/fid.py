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


def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), the trace term from the eigenvalues of C1^(1/2) C2 C1^(1/2)."""
    w, V = torch.linalg.eigh(cov1)
    sqrt1 = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(sqrt1 @ cov2 @ sqrt1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


def reference(net, images, path, device):
    """Mean and covariance of the real images' features, computed once and kept in path (written atomically)."""
    if not os.path.exists(path):
        torch.save(feature_stats(features(net, images, device)[0]), path + ".tmp")
        os.replace(path + ".tmp", path)
    return torch.load(path, weights_only=True)


def setup(data, args):
    """(net, mu, cov) of --fid-backend, the reference statistics cached in --out (named in the terminal and in each
    arm's config.json): --fid-samples random training images (pytorch-fid) or held-out images (classifier), latents
    decoded by the autoencoder; None when pytorch-fid or its weights are missing."""
    if args.fid_backend == "classifier":
        net = load_classifier(args.fid_weights, args.device)
        x, tag = data["heldout_x"], f"classifier_{sha256(args.fid_weights)[:12]}"
    else:
        net, x, tag = load_inception(args.device), data["train_x"], "pytorch-fid"
    if net is None:
        return None
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:args.fid_samples]
    real = x[pick.to(x.device)]
    images = hashlib.sha256(real.cpu().numpy().tobytes()).hexdigest()[:12]       # the cache names its images
    args.fid_reference = os.path.join(args.out, f"fid_ref_{tag}_{args.dataset}_{len(real)}_{images}.pt")
    real = real.float() / 127.5 - 1 if real.dtype == torch.uint8 else data["decode"](real)    # latents: decoded
    print(f"FID ({args.fid_backend}) against the statistics of {len(real)} images in {args.fid_reference}")
    return net, *reference(net, real, args.fid_reference, args.device)


def measures(net, mu, cov, images, labels, device):
    """Sample quality of class-conditional samples (images in [-1, 1] drawn for labels): {"fid": the Frechet distance
    to the reference}, with the classifier also {"sample_accuracy": the share classified as their label}."""
    f, pred = features(net, images, device)
    out = dict(fid=frechet_distance(*feature_stats(f), mu, cov))
    if pred is not None:
        out["sample_accuracy"] = (pred == labels.cpu()).float().mean().item()
    return out
