"""The per-seed markdown table of DEMO_RESULTS.md from a demo or probe output folder.

    python benchmarks/demo_probes/table.py DIR"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CHECKS = ("v2_better", "nfr_ge_4pct", "negative_flips_ge_100", "adapter_converged")


def main(root: str) -> None:
    res = json.loads(Path(f"{root}/results.json").read_text())
    det = json.loads(Path(f"{root}/details.json").read_text())
    rows = "muscle" in res["seeds"][0]["models"]
    head = ["seed", "v1 acc", "v2 acc", "NFR", "neg. flips", "v2 adapter best val (step)",
            "CE control val", "setting holds"]
    if rows:
        head += ["MUSCLE d%NFR_c", "MUSCLE dacc_c", "old_correct d%NFR_c", "all_old d%NFR_c",
                 "CE control d%NFR_c", "CE dacc_c"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for s, dd in zip(res["seeds"], det["seeds"]):
        m, c, a = s["models"], dd["checks"], dd["task_adapters"]["v2"]
        failed = [k for k in CHECKS if not c[k]]
        cells = [str(s["seed"]), f"{100 * m['v1']['acc']:.2f}", f"{100 * m['v2']['acc']:.2f}",
                 f"{100 * m['v2']['nfr']:.2f}", str(m["v2"]["n_negative_flips"]),
                 f"{a['best_val_loss']:.3f} ({a['best_step']})", f"{c['ce_control_val_loss']:.3f}",
                 "no: " + ", ".join(failed) if failed else "yes"]
        if rows:
            for row in ("muscle", "old_correct", "all_old", "ce_control"):
                cells.append(f"{100 * m[row]['d_pct_nfr_c']:+.1f}")
                if row in ("muscle", "ce_control"):
                    cells.append(f"{100 * m[row]['dacc_c']:+.2f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
