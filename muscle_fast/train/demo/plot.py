"""Step 7 of the demo, its figure: negative flips per row and seed, and the old-vs-row flip grids."""
from __future__ import annotations

import numpy as np

from .setting import CACHE_TOPK_K

_ROWS = ("v2", "muscle", "muscle_cache_hidden", "muscle_cache_topk", "old_correct", "all_old",
         "token_likelihood", "sequence_likelihood", "ce_control", "ce_control_4x")
_LABEL = {"v2": "v2 (new)", "muscle": "MUSCLE", "muscle_cache_hidden": "MUSCLE, cache: hidden",
          "muscle_cache_topk": f"MUSCLE, cache: topk k={CACHE_TOPK_K}",
          "old_correct": "old_correct", "all_old": "plain KD",
          "token_likelihood": "token_likelihood + CE",
          "sequence_likelihood": "sequence_likelihood + CE", "ce_control": "CE control",
          "ce_control_4x": "CE control, 4x steps"}
_COLOR = {"v2": "#999999", "muscle": "#e69138", "muscle_cache_hidden": "#f6b26b",
          "muscle_cache_topk": "#b45f06", "old_correct": "#6fa8dc", "all_old": "#8e7cc3",
          "token_likelihood": "#c27ba0", "sequence_likelihood": "#a64d79",
          "ce_control": "#6aa84f", "ce_control_4x": "#38761d"}


def plot_demo(results: list[dict], details: list[dict], path) -> None:
    """Left: negative flips (v1 right, row wrong) per row, one group of bars per seed, the
    row's accuracy above each bar. Right: 2x2 outcome grids v1 vs row, summed over seeds."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = [r for r in _ROWS if r in results[0]["models"]]
    grid_rows = [r for r in ("v2", "muscle", "ce_control") if r in rows]
    fig = Figure(figsize=(6 + 3.2 * len(grid_rows), 4.8))
    gs = fig.add_gridspec(1, 1 + len(grid_rows), width_ratios=[2.2] + [1] * len(grid_rows))
    ax = fig.add_subplot(gs[0, 0])
    width = 0.8 / len(rows)
    x = np.arange(len(results))
    for i, row in enumerate(rows):
        n = [r["models"][row]["n_negative_flips"] for r in results]
        acc = [r["models"][row]["acc"] for r in results]
        bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, n, width, color=_COLOR[row],
                      label=_LABEL[row])
        for b, a in zip(bars, acc):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{100 * a:.0f}",
                    ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, [f"seed {r['seed']}" for r in results])
    ax.set_ylabel(f"negative flips (of {results[0]['n_test']} held-out items)")
    ax.set_title("negative flips vs v1 per row (number above a bar: its accuracy, %)", fontsize=9)
    ax.legend(fontsize=8)

    kinds = [["kept correct", "NEGATIVE FLIP"], ["positive flip", "kept wrong"]]
    colors = [["#d9ead3", "#e06666"], ["#93c47d", "#eeeeee"]]
    total = sum(r["n_test"] for r in results)
    for k, row in enumerate(grid_rows):
        g = np.sum([d["flip_grids"][row] for d in details], axis=0)
        a = fig.add_subplot(gs[0, 1 + k])
        for i in range(2):
            for j in range(2):
                a.add_patch(Rectangle((j, 1 - i), 1, 1, color=colors[i][j], ec="white", lw=3))
                a.text(j + 0.5, 1.62 - i, f"{g[i, j]}", ha="center", va="center", fontsize=15,
                       weight="bold")
                a.text(j + 0.5, 1.3 - i, f"{100 * g[i, j] / total:.1f}%\n{kinds[i][j]}",
                       ha="center", va="center", fontsize=8)
        a.set_xlim(0, 2), a.set_ylim(0, 2)
        a.set_xticks([0.5, 1.5], [f"{_LABEL[row]}\ncorrect", f"{_LABEL[row]}\nwrong"], fontsize=8)
        a.set_yticks([1.5, 0.5], ["v1 correct", "v1 wrong"], fontsize=8)
        a.tick_params(length=0)
        a.set_aspect("equal")
        a.set_title(f"v1 -> {_LABEL[row]}, all seeds", fontsize=9)
    fig.suptitle(f"MUSCLE demo, seeds {', '.join(str(r['seed']) for r in results)}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
