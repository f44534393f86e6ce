"""
keep_ckpts.py: keeps a copy of each arm's checkpoint at chosen steps, for a run whose code predates --keep-every
(w64_d24_s0): polls the checkpoints' modification times every minute and copies a checkpoint whose step is wanted.
    python results/long/keep_ckpts.py RUN_DIR STEPS KEEP    e.g. runs/long/w64_d24_s0 1000,2000,4000,8000 /work/keep
Copies go to KEEP/<run>_<arm>_<step>.pt (outside the repository); results/long/diagnose.sh reads them.
"""
import os
import shutil
import sys
import time

import torch


def main():
    """Polls until killed."""
    root, steps, keep = sys.argv[1], {int(s) for s in sys.argv[2].split(",")}, sys.argv[3]
    seen = {}
    while True:
        for arm in ("residual", "dar"):
            path = os.path.join(root, arm, "ckpt.pt")
            if not os.path.exists(path) or seen.get(path) == os.path.getmtime(path):
                continue
            seen[path] = os.path.getmtime(path)
            step = torch.load(path, map_location="cpu", weights_only=True)["step"]
            copy = os.path.join(keep, f"{os.path.basename(root)}_{arm}_{step}.pt")
            if step in steps and not os.path.exists(copy):
                shutil.copy(path, copy)
                print("kept", copy, flush=True)
        time.sleep(60)


if __name__ == "__main__":
    main()
