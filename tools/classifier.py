"""
classifier.py: the offline feature network of train_cifar.py's --fid-backend classifier: a small CNN (tools/fid.py's
Classifier) trained on a data set's training images, seeded, with flips and shifts; it reports its accuracy on the
held-out images and writes its weights, that accuracy and their SHA-256 (FILE and FILE.json). A rebuild on another
machine gives close but not identical weights (float summation order): compare runs scored with the same file.

    python tools/classifier.py --dataset folder --data-dir DIR/train --val-dir DIR/test --out results/classifier/cifar10.pt
    python tools/classifier.py --dataset shapes --image-size 16 --out results/classifier/shapes.pt
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.fid import Classifier, features, sha256  # noqa: E402
from train_cifar import load_data, parse_args  # noqa: E402


def augment(x, g):
    """Random horizontal flips and shifts of up to 2 pixels (reflected padding) of images x (B, C, H, W)."""
    B, _, H, W = x.shape
    x = torch.where(torch.rand(B, 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()             # one shift per batch
    return padded[:, :, dy:dy + H, dx:dx + W]


def accuracy(net, x, y):
    """The share of images x (uint8) that net classifies as y."""
    return (features(net, x.float() / 127.5 - 1, "cpu")[1] == y).float().mean().item()


def train(data, epochs, width, batch_size, lr, seed):
    """The classifier after epochs of AdamW with a cosine schedule, in eval mode."""
    torch.manual_seed(seed)
    x, y = data["train_x"], data["train_y"]
    net = Classifier(data["num_classes"], x.shape[1], width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (len(x) // batch_size)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        epoch, i = divmod(step, len(x) // batch_size)
        if i == 0:
            order = torch.randperm(len(x), generator=g)
            net.train()
        idx = order[i * batch_size:(i + 1) * batch_size]
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(net(augment(x[idx].float() / 127.5 - 1, g)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == len(x) // batch_size - 1:
            print(f"epoch {epoch + 1}/{epochs}: training loss {loss.item():.3f}", flush=True)
    return net.eval()


def main(argv=None):
    """Options: --epochs, --width, --batch-size, --lr, --seed, --out and train_cifar.py's data options."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                epilog="data options: as train_cifar.py (--dataset, --data-dir, --val-dir, --image-size)")
    a = p.add_argument
    a("--epochs", type=int, default=8)
    a("--width", type=int, default=16, help="channels of the first stage (then 2x, 4x)")
    a("--batch-size", type=int, default=128)
    a("--lr", type=float, default=3e-3)
    a("--seed", type=int, default=0)
    a("--out", required=True, help="the weights file to write")
    own, rest = p.parse_known_args(argv)
    if min(own.epochs, own.width, own.batch_size) < 1 or not own.lr > 0:
        p.error("--epochs, --width and --batch-size must be positive and --lr > 0")
    args = parse_args(rest + ["--device", "cpu", "--out", os.path.dirname(own.out) or "."])
    data = load_data(args)
    if not data["images"]:
        raise ValueError("the classifier is trained on images (uint8), not on latents")
    t0 = time.time()
    net = train(data, own.epochs, own.width, own.batch_size, own.lr, own.seed)
    acc = accuracy(net, data["heldout_x"], data["heldout_y"])
    os.makedirs(os.path.dirname(own.out) or ".", exist_ok=True)
    torch.save(dict(model=net.state_dict(), config=net.config), own.out + ".tmp")
    os.replace(own.out + ".tmp", own.out)
    info = dict(file=os.path.basename(own.out), sha256=sha256(own.out), heldout_accuracy=acc,
                heldout_images=len(data["heldout_x"]), train_images=len(data["train_x"]), seconds=time.time() - t0,
                threads=torch.get_num_threads(), torch=torch.__version__, classes=data["class_names"],
                command=" ".join(["python", "tools/classifier.py"] + (sys.argv[1:] if argv is None else list(argv))),
                options=vars(own))
    with open(own.out + ".json", "w") as f:
        json.dump(info, f, indent=1)
    print(f"held-out accuracy {acc:.4f} on {len(data['heldout_x'])} images; wrote {own.out} (sha256 "
          f"{info['sha256'][:16]}...) in {info['seconds']:.0f} s")
    return info


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
