"""fused_linear_compat_loss vs the materialised path on CPU: time and peak memory above inputs.

Each path runs in its own subprocess: one warm-up step (lazy imports), then the peak-RSS growth
of one forward+backward (Linux: VmHWM after resetting it through /proc/self/clear_refs), then the median of timed steps.
Correctness is checked (in the parent) before any timing.

    PYTHONPATH=. python benchmarks/bench_linear_cpu.py [--n 4096 --h 256 --v 32000 --reps 5]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

PATHS = ("materialised", "chunked")


def make_inputs(n, h, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) / h ** 0.5
    oh, ow = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / h ** 0.5
    nh = x + 0.5 * torch.randn(n, h, generator=g)
    nw = w + 0.3 * torch.randn(v, h, generator=g) / h ** 0.5
    y = torch.randint(0, v, (n,), generator=g)
    return x, w, oh, ow, nh, nw, y


def step(path, x, w, oh, ow, nh, nw, y, impl):
    """One forward+backward; returns (loss, grad_hidden, grad_weight)."""
    from muscle_fast.linear import fused_linear_compat_loss
    from muscle_fast.loss import fused_compat_loss

    xs, ws = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    if path == "materialised":
        with torch.no_grad():
            old, new = F.linear(oh, ow), F.linear(nh, nw)
        loss = fused_compat_loss(F.linear(xs, ws), y, old, new, impl=impl)
    else:
        loss = fused_linear_compat_loss(xs, ws, y, old_hidden=oh, old_weight=ow, new_hidden=nh,
                                        new_weight=nw, impl=impl)
    loss.backward()
    return loss.detach(), xs.grad, ws.grad


def _status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def child(args):
    torch.set_num_threads(args.threads)
    x, w, oh, ow, nh, nw, y = make_inputs(args.n, args.h, args.v)
    sl = slice(0, 8)
    step(args.path, x[sl], w, oh[sl], ow, nh[sl], nw, y[sl], args.impl)  # lazy imports
    with open("/proc/self/clear_refs", "w") as f:  # Linux: peak RSS (VmHWM) := current RSS
        f.write("5")
    before = _status_kib("VmRSS:")
    step(args.path, x, w, oh, ow, nh, nw, y, args.impl)
    growth = (_status_kib("VmHWM:") - before) * 1024
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step(args.path, x, w, oh, ow, nh, nw, y, args.impl)
        times.append(time.perf_counter() - t0)
    inputs = sum(t.numel() * t.element_size() for t in (x, w, oh, ow, nh, nw, y))
    print(json.dumps({"path": args.path, "peak_growth_bytes": growth, "inputs_bytes": inputs,
                      "median_s": statistics.median(times), "times_s": times}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--impl", default="native")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "linear_cpu.jsonl"))
    args = p.parse_args()
    if args.path:
        return child(args)

    # correctness before timing, at a smaller N of the same shape family
    inputs = make_inputs(min(args.n, 512), args.h, args.v, seed=1)
    ref = step("materialised", *inputs, args.impl)
    got = step("chunked", *inputs, args.impl)
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), got, ref):
        err = (a - b).abs().max().item()
        scale = b.abs().max().item()
        assert err <= 1e-5 * max(scale, 1.0), f"{name}: chunked differs from materialised by {err}"

    rows = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    for path in PATHS:
        cmd = [sys.executable, __file__, "--path", path, "--n", str(args.n), "--h", str(args.h),
               "--v", str(args.v), "--reps", str(args.reps), "--impl", args.impl,
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row.update(device=f"cpu ({platform.processor() or platform.machine()}, "
                          f"{args.threads} threads)", dtype="float32", N=args.n, H=args.h,
                   V=args.v, backend=args.impl, commit=commit, torch=torch.__version__,
                   date=datetime.date.today().isoformat())
        rows.append(row)
        print(f"{path:13s} median {row['median_s'] * 1e3:8.1f} ms   peak above inputs "
              f"{row['peak_growth_bytes'] / 2**20:8.1f} MiB")
    mat, chk = rows
    mem_ratio = chk["peak_growth_bytes"] / mat["peak_growth_bytes"]
    time_ratio = chk["median_s"] / mat["median_s"]
    print(f"chunked / materialised: peak memory above inputs {mem_ratio:.3f}, time {time_ratio:.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps({**row, "mem_ratio": mem_ratio, "time_ratio": time_ratio}) + "\n")


if __name__ == "__main__":
    main()
