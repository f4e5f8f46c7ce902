"""``python -m benchmarks``: run a preset (or a custom grid), print the table, append the CSV.

    PYTHONPATH=. python -m benchmarks --preset quick --plot
    PYTHONPATH=. python -m benchmarks --n 2048 --v 32000 --dtype fp32 bf16 --mode full
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import textwrap
import time
from pathlib import Path

import torch

from . import harness as H

TABLE_WIDTH = 100  # fits a terminal, a log file and a pull-request comment alike


def _fmt(x) -> str:
    if not isinstance(x, float):
        return str(x)
    if math.isnan(x):
        return ""
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.1f}" if abs(x) >= 100 else f"{x:.4g}"


def print_table(rows, copy_gbps: float, env: dict) -> None:
    """One block per case (op, mode, mask, N, V, dtype), a line per backend, every line at most
    TABLE_WIDTH columns; the CSV holds every column."""
    wrap = textwrap.TextWrapper(width=TABLE_WIDTH, subsequent_indent="#   ")
    print(wrap.fill(f"# {env['device']} | threads {env['threads']} | torch {env['torch']} | "
                    f"triton {env['triton']} | commit {env['commit']} | {env['date']} UTC"))
    print(wrap.fill(f"# copy bandwidth (read + write): {copy_gbps / 1e9:.1f} GB/s; floor = "
                    "(docs/SPEC.md section 4 minimal bytes / copy bandwidth) / median; design: "
                    "the same with the design's bytes; vs eager: eager median / median"))
    cases = {}
    for r in rows:
        cases.setdefault((r["op"], r["mode"], r["mask"], r["N"], r["V"], r["dtype"]), []).append(r)
    hdr = ("backend", "median ms (p20-p80)", "peak MB", "GB/s", "floor", "design", "vs eager")
    for (op, mode, mask, n, v, dtype), group in cases.items():
        eager = next((r["median_ms"] for r in group
                      if r["backend"] == "eager" and r["status"] == "ok"), None)
        lines, notes = [], []
        for r in group:
            if r["status"] == "ok":
                ratio = f"{eager / r['median_ms']:.2f}x" if eager else ""
                lines.append((r["backend"], f"{_fmt(r['median_ms'])} ({_fmt(r['p20_ms'])}-"
                              f"{_fmt(r['p80_ms'])})") + tuple(
                    _fmt(r.get(k, "")) for k in ("peak_mb", "gbps", "floor_fraction",
                                                 "design_fraction")) + (ratio,))
            else:
                lines.append((r["backend"], r["status"]) + ("",) * 5)
            if r.get("note"):
                notes.append(wrap.fill(f"#   {r['backend']}: {r['note']}"))
        widths = [max(len(x[i]) for x in [hdr] + lines) for i in range(len(hdr))]
        print(f"\n## {op} {mode} mask={mask} N={n} V={v} {dtype}")
        for x in [hdr] + lines:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(x, widths))).rstrip()[:TABLE_WIDTH])
        for note in notes:
            print(note)


def append_csv(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=H.COLUMNS, extrasaction="ignore")
        if new:
            wr.writeheader()
        for r in rows:
            wr.writerow({k: r.get(k, "") for k in H.COLUMNS})


def main(argv=None, prog: str = "python -m benchmarks") -> int:
    """Run the harness; ``prog`` is the command name in ``--help`` (``muscle-fast bench`` from the
    console script)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].split(": ", 1)[1])
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
    p.add_argument("--out", type=Path, default=None,
                   help=f"CSV to append (default: {H.RESULTS}/cpu.csv, or gpu.csv on a GPU)")
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
