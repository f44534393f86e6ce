"""Where does DAR's step time go on a GPU? Wall time vs GPU kernel time per training step, and the top kernels.

    python results/gpu/profile_step.py OUT_DIR      (DiT-S/2, 32x32, batch 256, bf16: the benchmark's setting)
"""
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from dar_minimal import DiT, flow_matching_loss  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "."
dev = "cuda" if torch.cuda.is_available() else "cpu"
B, size = (256, 32) if dev == "cuda" else (8, 16)
cfg = dict(input_size=size, patch_size=2, hidden_size=384 if dev == "cuda" else 48, depth=12, num_heads=6)
result = {}
for arm, kw in [("residual", dict(routing="residual")), ("dar static_t c4", dict(dar_query="static_t", dar_chunk=4))]:
    torch.manual_seed(0)
    model = DiT(**cfg, **kw).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(B, 3, size, size, device=dev), torch.randint(0, 10, (B,), device=dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = flow_matching_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(3):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 5
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])) as p:
        for _ in range(3):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
    events = p.key_averages()
    gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in events) / 3
    kernels = sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))[:15]
    result[arm] = dict(wall_ms=wall * 1e3, gpu_kernel_ms=gpu_us / 1e3,
                       launches_per_step=sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                                  "cudaLaunchKernelExC")) / 3,
                       top_kernels=[(e.key[:80], getattr(e, "self_device_time_total", 0) / 3e3, e.count // 3)
                                    for e in kernels])
    print(arm, {k: v for k, v in result[arm].items() if k != "top_kernels"})
    for k in result[arm]["top_kernels"]:
        print("   ", k)
with open(f"{out}/profile_step.json", "w") as f:
    json.dump(dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                   config=dict(cfg, batch=B), result=result), f, indent=1)
