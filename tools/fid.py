"""
fid.py: FID for train_cifar.py's --fid-every: pytorch-fid's port of the TF-Inception network that published FIDs
use (the optional pytorch-fid package; its weights are downloaded on first use), the statistics of real images
cached in a file, and the Frechet distance.
"""
import os

import torch


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
    """Pool features (N, 2048, float64) of images in [-1, 1]."""
    return torch.cat([net((images[i:i + batch].to(device).float().clamp(-1, 1) + 1) / 2)[0].flatten(1).double().cpu()
                      for i in range(0, len(images), batch)])


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
        torch.save(feature_stats(features(net, images, device)), path + ".tmp")
        os.replace(path + ".tmp", path)
    return torch.load(path, weights_only=True)


def setup(data, args):
    """(net, mu, cov) for FID against --fid-samples random training images (uint8), statistics cached in --out (the
    file is named in the terminal and in each arm's config.json); None when pytorch-fid or its weights are missing."""
    net = load_inception(args.device)
    if net is None:
        return None
    args.fid_reference = os.path.join(args.out, f"fid_ref_{args.dataset}_{args.fid_samples}.pt")
    pick = torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(0))[:args.fid_samples]
    real = data["train_x"][pick.to(data["train_x"].device)].float() / 127.5 - 1
    print(f"FID against the statistics of {len(real)} training images in {args.fid_reference}")
    return net, *reference(net, real, args.fid_reference, args.device)


def fid(net, mu, cov, images, device):
    """FID of images in [-1, 1] against the reference statistics (mu, cov)."""
    return frechet_distance(*feature_stats(features(net, images, device)), mu, cov)
