"""Time-vs-N and peak-memory-vs-N charts (PNG) from a results CSV (rows with status "ok")."""
from __future__ import annotations

from pathlib import Path
from typing import List

import pandas as pd


def plot_csv(csv_path: Path, out_dir: Path = None) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    out_dir = Path(out_dir or csv_path.parent)
    df = pd.read_csv(csv_path)
    df = df[df["status"] == "ok"].copy()
    if df.empty:
        return []
    # the latest run of each (case, backend) only
    df = df.sort_values("date").drop_duplicates(
        ["op", "backend", "mode", "mask", "N", "V", "H", "dtype", "device"], keep="last")
    pngs = []
    backends = sorted(df.backend.unique())  # one colour per backend across every chart
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (op, device, mode, mask), g in df.groupby(["op", "device", "mode", "mask"]):
        panels = sorted(g.groupby(["V", "H", "dtype"]).groups)
        fig, axes = plt.subplots(2, len(panels), figsize=(max(4.2 * len(panels), 7.5), 7),
                                 squeeze=False)
        for j, (v, h, dt) in enumerate(panels):
            sub = g[(g.V == v) & (g.H == h) & (g.dtype == dt)]
            for backend, b in sub.groupby("backend"):
                b = b.sort_values("N")
                color = colors[backends.index(backend) % len(colors)]
                axes[0, j].errorbar(b.N, b.median_ms, yerr=[b.median_ms - b.p20_ms,
                                                            b.p80_ms - b.median_ms],
                                    marker="o", capsize=3, label=backend, color=color)
                axes[1, j].plot(b.N, b.peak_mb, marker="o", label=backend, color=color)
            title = f"V={v}" + (f" H={h}" if h else "") + f" {dt}"
            axes[0, j].set(title=title, xlabel="N (tokens)", ylabel="median ms (p20-p80)",
                           xscale="log", yscale="log")
            axes[1, j].set(xlabel="N (tokens)", ylabel="peak MB above inputs", xscale="log")
            ns = sorted(sub.N.unique())
            for ax in axes[:, j]:
                ax.grid(alpha=0.3)
                ax.minorticks_off()
                ax.set_xticks(ns)
                ax.set_xticklabels([str(n) for n in ns])
        axes[0, 0].legend(fontsize=7)
        commits = ",".join(sorted(g.commit.astype(str).unique()))
        fig.suptitle(f"{op} {mode} mask={mask} | {device} | commit {commits}", fontsize=9)
        fig.tight_layout()
        dev = "cpu" if str(device).startswith("cpu") else "gpu"
        png = out_dir / f"{op}_{mode}_{mask}_{dev}.png"
        fig.savefig(png, dpi=90)
        plt.close(fig)
        pngs.append(png)
    return pngs
