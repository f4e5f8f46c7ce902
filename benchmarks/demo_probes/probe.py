"""A design probe of ``muscle-fast demo`` on design seeds (never the default ones): runs the demo
with DemoConfig overrides and prints one compact line per seed (the rungs and the rows'
d%NFR_c / dacc_c), plus the per-op accuracies of v1 and v2.

    python benchmarks/demo_probes/probe.py NAME SEEDS [OVERRIDES_JSON] [ROWS]

SEEDS: e.g. 0,1,2. OVERRIDES_JSON: DemoConfig fields, with "v1"/"v2" holding BaseSpec fields
(a "mix" as [[op, weight], ...]). ROWS: comma-separated compatibility rows (default: all).
Output under $PROBE_DIR/NAME (default demo_probes_out/NAME); bases are shared between probes
through $PROBE_DIR/cache (a base is keyed by everything that decides it)."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from muscle_fast.train.demo import run as R
from muscle_fast.train.demo.setting import OPS, V1, V2, DemoConfig

ROOT = Path(os.environ.get("PROBE_DIR", "demo_probes_out"))


def config(over: dict) -> DemoConfig:
    over = dict(over)
    specs = {}
    for name, default in (("v1", V1), ("v2", V2)):
        o = dict(over.pop(name, {}))
        if "mix" in o:
            o["mix"] = tuple((op, float(w)) for op, w in o["mix"])
        specs[name] = replace(default, **o)
    return replace(DemoConfig(), **specs, **over)


def main(name: str, seeds: list[int], over: dict, rows: list[str] | None) -> None:
    cfg = config(over)
    if rows:
        cfg = replace(cfg, rows=tuple(rows))
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    (ROOT / "cache").mkdir(parents=True, exist_ok=True)
    if not (out / "cache").exists():
        (out / "cache").symlink_to((ROOT / "cache").resolve())
    t = time.perf_counter()
    res = R.run_demo(out, seeds, cfg=cfg, quiet=True)
    det = json.loads((out / "details.json").read_text())
    for s, d in zip(res["seeds"], det["seeds"]):
        m, g = s["models"], d["rungs"]
        r2 = g["2_converged_adapters"]
        line = (f"{name} seed {s['seed']}: v1 {100 * m['v1']['acc']:.1f} v2 {100 * m['v2']['acc']:.1f} "
                f"NFR {100 * m['v2']['nfr']:.1f} PFR {100 * m['v2']['pfr']:.1f} | rungs "
                f"{''.join('?' if v['holds'] is None else 'YN'[not v['holds']] for v in g.values())}"
                f" | kept {r2['kept_step']['v1']}/{r2['kept_step']['v2']} "
                f"train-right v1 {100 * d['train_answer_tokens_right']['v1']:.0f} v2 "
                f"{100 * d['train_answer_tokens_right']['v2']:.0f} | ")
        line += " ".join(f"{row} {100 * m[row]['d_pct_nfr_c']:+.1f}/{100 * m[row]['dacc_c']:+.1f}"
                         for row in cfg.rows if row in m)
        if "muscle" in m:
            log = d["train_log"]["muscle"]
            line += f" | to_v1 {100 * log[0]['frac_to_old']:.0f}->{100 * log[-1]['frac_to_old']:.0f}"
        print(line)
        print("   per-op v1/v2: " + " ".join(
            f"{op} {100 * d['per_op_acc'][op]['v1']:.0f}/{100 * d['per_op_acc'][op]['v2']:.0f}"
            for op in OPS))
    print(f"{name}: wall {time.perf_counter() - t:.0f} s, cpu {det['cpu_s']} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2].split(",")],
         json.loads(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else {},
         sys.argv[4].split(",") if len(sys.argv) > 4 else None)
