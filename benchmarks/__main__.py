"""``python -m benchmarks``: run a preset (or a custom grid), print the table, append the CSV.

    PYTHONPATH=. python -m benchmarks --preset quick --plot
    PYTHONPATH=. python -m benchmarks --n 2048 --v 32000 --dtype fp32 bf16 --mode full
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from . import harness as H


def print_table(rows, copy_gbps: float, env: dict) -> None:
    print(f"# {env['device']} | threads {env['threads']} | torch {env['torch']} | triton "
          f"{env['triton']} | commit {env['commit']} | {env['date']} UTC")
    print(f"# copy bandwidth (read + write): {copy_gbps / 1e9:.1f} GB/s; floor fraction = "
          "(docs/SPEC.md section 4 minimal bytes / copy bandwidth) / median")
    hdr = ("op", "mode", "mask", "N", "V", "dtype", "backend", "status", "median_ms", "p20_ms",
           "p80_ms", "peak_mb", "gbps", "floor_fraction", "design_fraction", "vs_eager", "note")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(*hdr, show_lines=False)
        from rich.markup import escape

        emit = lambda r: table.add_row(*[escape(str(x)) for x in r])  # noqa: E731
    except ImportError:
        table = None
        print(" | ".join(hdr))
        emit = lambda r: print(" | ".join(str(x) for x in r))  # noqa: E731
    eager = {}
    for r in rows:
        if r["backend"] == "eager" and r["status"] == "ok":
            eager[(r["op"], r["mode"], r["mask"], r["N"], r["V"], r["dtype"])] = r["median_ms"]
    for r in rows:
        key = (r["op"], r["mode"], r["mask"], r["N"], r["V"], r["dtype"])
        ok = r["status"] == "ok"
        ratio = f"{eager[key] / r['median_ms']:.2f}x" if ok and key in eager else ""
        emit([r["op"], r["mode"], r["mask"], r["N"], r["V"], r["dtype"], r["backend"],
              r["status"]] + [r.get(k, "") if ok else "" for k in
                              ("median_ms", "p20_ms", "p80_ms", "peak_mb", "gbps",
                               "floor_fraction", "design_fraction")] + [ratio, r.get("note", "")])
    if table is not None:
        Console(width=250).print(table)


def append_csv(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=H.COLUMNS, extrasaction="ignore")
        if new:
            wr.writeheader()
        for r in rows:
            wr.writerow({k: r.get(k, "") for k in H.COLUMNS})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("quick", "headline", "cpu", "gpu"),
                   help="a predefined grid (default: quick unless --n/--v are given)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--op", default="compat_loss", choices=("compat_loss", "linear_compat_loss"))
    p.add_argument("--n", type=int, nargs="+")
    p.add_argument("--v", type=int, nargs="+", default=[32000])
    p.add_argument("--h", type=int, default=256, help="hidden size (linear_compat_loss)")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(H.DTYPES))
    p.add_argument("--mask", nargs="+", default=["muscle"], choices=("muscle", "old_correct"))
    p.add_argument("--mode", nargs="+", default=["fwd", "full"], choices=("fwd", "full"))
    p.add_argument("--peers", nargs="+", choices=H.PEER_NAMES, help="default: every peer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-gb", type=float, default=None,
                   help="skip cases whose inputs exceed this (default: 1/4 of RAM or GPU memory)")
    p.add_argument("--out", type=Path, default=None, help="CSV to append (default results/<dev>.csv)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--plot", action="store_true", help="draw time/memory vs N PNGs from the CSV")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    preset = "quick" if args.quick else args.preset
    if preset is None and not args.n:
        preset = "quick"
    if preset:
        cases = H.preset_cases(preset, device)
    else:
        cases = [H.Case(args.op, mode, mask, n, v, dt, H=args.h if args.op != "compat_loss" else 0)
                 for v in args.v for dt in args.dtype for mask in args.mask
                 for mode in args.mode for n in args.n]
    peers = [pp for pp in H.PEERS if not args.peers or pp.name in args.peers]
    if args.max_gb is None:
        total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                 else __import__("os").sysconf("SC_PHYS_PAGES") * __import__("os").sysconf("SC_PAGE_SIZE"))
        args.max_gb = total / 4 / 1e9
    t0 = time.perf_counter()
    s = H.make_settings(device, quick=preset == "quick")
    out = args.out or H.RESULTS / f"{'cpu' if device.type == 'cpu' else 'gpu'}.csv"
    all_rows = []
    for case in cases:
        if H.case_bytes(case) > args.max_gb * 1e9:
            rows = [dict(op=case.op, mode=case.mode, mask=case.mask, N=case.N, V=case.V, H=case.H,
                         dtype=case.dtype, backend="*", status="skipped",
                         note=f"inputs {H.case_bytes(case) / 1e9:.1f} GB > --max-gb {args.max_gb:.1f}",
                         **s.env)]
        else:
            rows = H.run_case(case, peers, s)
        all_rows += rows
        for r in rows:
            print(f"  {r['op']} {r['mode']} {r['mask']} N={r['N']} V={r['V']} {r['dtype']} "
                  f"{r['backend']}: {r['status']} {r.get('median_ms', '')} ms "
                  f"peak {r.get('peak_mb', '')} MB frac {r.get('floor_fraction', '')} "
                  f"{r.get('note', '')}", flush=True)
        if not args.no_save:
            append_csv(rows, out)
    print_table(all_rows, s.copy_gbps, s.env)
    print(f"# wall time {time.perf_counter() - t0:.1f} s; rows appended to {out}"
          if not args.no_save else f"# wall time {time.perf_counter() - t0:.1f} s")
    if args.plot:
        from .plot import plot_csv

        for png in plot_csv(out):
            print(f"# plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
