"""Two versions of dar_minimal.py, one process, training steps alternated: the residual step, and for each version's
DAR (static+t, chunk 4, tiny preset model) the step time and the time spent inside Push (forward and backward).

    python results/cpu/ab_versions.py OLD.py NEW.py [--batch-size 64] [--repeats 20]

Prints medians and the medians over rounds of NEW / OLD (paired ratios). Used for changes inside Push, whose effect
on a whole step (a few percent) is smaller than this VM's drift between separate benchmark runs.
"""
import argparse
import importlib.util
import statistics
import time

import torch


def load(name, path):
    """Import a dar_minimal.py from a path under its own module name."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_push(module, clock):
    """Wrap module.Push's forward and backward so that their time adds up in clock[0] and clock[1]."""
    def wrap(f, j):
        def g(ctx, *args):
            t0 = time.perf_counter()
            out = f(ctx, *args)
            clock[j] += time.perf_counter() - t0
            return out
        return staticmethod(g)
    module.Push.forward, module.Push.backward = wrap(module.Push.forward, 0), wrap(module.Push.backward, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    tiny = dict(input_size=32, patch_size=4, hidden_size=128, depth=8, num_heads=4)    # train_cifar.py's tiny
    clock = [0.0, 0.0]
    arms = {}
    for name, path, kw in [("residual", args.old, dict(routing="residual")),
                           ("old", args.old, dict(dar_query="static_t", dar_chunk=4)),
                           ("new", args.new, dict(dar_query="static_t", dar_chunk=4))]:
        module = load(f"dar_{name}", path)
        if name != "residual":
            timed_push(module, clock)
        torch.manual_seed(0)
        model = module.DiT(**tiny, **kw)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt, module=module):
            loss = module.flow_matching_loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        arms[name] = step
    times = {name: [] for name in arms}                  # (step, Push forward, Push backward) per round
    for r in range(args.repeats + 2):                    # two warm-up rounds
        for name, step in arms.items():
            clock[0] = clock[1] = 0.0
            t0 = time.perf_counter()
            step()
            if r >= 2:
                times[name].append((time.perf_counter() - t0, clock[0], clock[1]))
    print(f"batch {args.batch_size}, {args.repeats} rounds; old {args.old}, new {args.new}")
    med = lambda v: 1e3 * statistics.median(v)
    for name, v in times.items():
        print(f"{name:9s} step {med([a for a, _, _ in v]):7.1f} ms   Push forward {med([b for _, b, _ in v]):6.2f} ms"
              f"  backward {med([c for _, _, c in v]):6.2f} ms")
    ratio = lambda f: statistics.median(f(n) / f(o) for n, o in zip(times["new"], times["old"]))
    print(f"new / old, paired: step {ratio(lambda t: t[0]):.3f}, Push {ratio(lambda t: t[1] + t[2]):.3f}")
    for name in ("old", "new"):
        print(f"{name} / residual, paired: step "
              f"{statistics.median(a[0] / b[0] for a, b in zip(times[name], times['residual'])):.3f}")


if __name__ == "__main__":
    main()
