"""Native CPU backend vs the PyTorch eager composition of the same loss (forward + gradient).

    python benchmarks/bench_native_cpu.py [--n 2048] [--v 32000] [--dtype fp32 bf16] [--reps 7]

Prints one row per (dtype, backend): median time, speed-up vs eager, bytes/s against the
contract's byte count, and this machine's measured copy bandwidth. Correctness is checked
against eager before any timing. Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from muscle_fast.ops.compat_loss import native

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def median_time(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(mb: int = 256, reps: int = 9) -> float:
    src = torch.randn(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / t  # read + write


def eager_loss(z, y, o, w, temperature, ignore_index=-100):
    """log_softmax / kl_div / argmax / where: the MUSCLE masked KL as a PyTorch user writes it."""
    zf = z.float()
    logp_s = F.log_softmax(zf / temperature, -1)
    kl_old = F.kl_div(
        logp_s, F.log_softmax(o.float() / temperature, -1), log_target=True, reduction="none"
    ).sum(-1)
    kl_new = F.kl_div(
        logp_s, F.log_softmax(w.float() / temperature, -1), log_target=True, reduction="none"
    ).sum(-1)
    valid = y != ignore_index
    to_old = zf.detach().argmax(-1) != y
    loss_i = torch.where(to_old, kl_old, kl_new)
    loss_i = torch.where(valid, loss_i, torch.zeros_like(loss_i))
    return loss_i.sum() / valid.sum().clamp(min=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--skip-eager", action="store_true")
    args = ap.parse_args()
    ok, why = native.native_available()
    assert ok, why
    N, V, T = args.n, args.v, args.temperature
    bw = copy_bandwidth()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    print(
        f"# {platform.processor() or platform.machine()}, threads={torch.get_num_threads()}, "
        f"isa={native._native.best_isa() if not native.ISA else native.ISA}, commit={commit}"
    )
    print(
        f"# copy bandwidth (256 MB copy_ into a preallocated tensor, read+write): {bw / 1e9:.1f} GB/s"
    )
    rows = []
    for name in args.dtype:
        dt = DTYPES[name]
        g = torch.Generator().manual_seed(0)
        z, o, w = (torch.randn(1, N, V, generator=g).mul_(3).to(dt) for _ in range(3))
        y = torch.randint(0, V, (N,), generator=g)
        y[::10] = -100
        grad = torch.empty_like(z)
        n_valid = int((y != -100).sum())
        scale = torch.tensor(1.0 / n_valid)

        def run_native(z=z, y=y, o=o, w=w, grad=grad, scale=scale):
            return native.compat_loss_native(
                z,
                y,
                o,
                w,
                None,
                grad,
                scale,
                mask_mode=1,
                inv_temperature=1.0 / T,
                kl_weight=1.0,
                ce_weight=0.0,
                ignore_index=-100,
                old_label_logprob=False,
            )

        grad.zero_()  # first touch of the preallocated gradient is not the kernel's memory
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        stats = run_native()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss_native = stats[:, 0].double().sum().item() / n_valid

        # correctness first: against eager run in float64 on the same values
        zz = z.detach().double().requires_grad_(True)
        ref = eager_loss(zz, y, o.double(), w.double(), T)
        ref.backward()
        err_loss = abs(loss_native - ref.item())
        err_grad = (grad.double() - zz.grad).abs().max().item()
        del zz, ref

        e = z.element_size()
        # contract bytes: stats pass reads z, o, w; gradient pass reads z and the chosen
        # teacher and writes grad. DRAM bytes: each input once + grad written.
        contract_bytes = N * V * (3 * e + 3 * e)
        dram_bytes = N * V * (3 * e + e)
        t_nat = median_time(run_native, args.reps)

        t_eager = float("nan")
        if not args.skip_eager:
            zl = z.detach().clone().requires_grad_(True)

            def run_eager(zl=zl, y=y, o=o, w=w):
                zl.grad = None
                eager_loss(zl, y, o, w, T).backward()

            t_eager = median_time(run_eager, max(3, args.reps // 2), warmup=1)
        row = {
            "device": "cpu",
            "dtype": name,
            "N": N,
            "V": V,
            "T": T,
            "mask": "muscle",
            "threads": torch.get_num_threads(),
            "native_s": t_nat,
            "eager_s": t_eager,
            "speedup": t_eager / t_nat,
            "native_dram_GBps": dram_bytes / t_nat / 1e9,
            "native_contract_GBps": contract_bytes / t_nat / 1e9,
            "copy_GBps": bw / 1e9,
            "floor_s": dram_bytes / bw,
            "frac_of_floor": (dram_bytes / bw) / t_nat,
            "err_loss_vs_f64": err_loss,
            "err_grad_vs_f64": err_grad,
            "native_peak_rss_growth_MB": (rss1 - rss0) / 1024,
            "commit": commit,
            "date": time.strftime("%Y-%m-%d"),
        }
        rows.append(row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
