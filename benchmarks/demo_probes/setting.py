"""Setting-only probe of ``muscle-fast demo``: bases, task adapters and the CE control, no MUSCLE
row, so a design can be chosen without looking at MUSCLE numbers (issue 17).

    python benchmarks/demo_probes/setting.py NAME SEEDS [OVERRIDES_JSON]

SEEDS: e.g. 0,1,2. OVERRIDES_JSON: DemoConfig fields, with "v1"/"v2" holding BaseSpec fields
(a "mix" as [[op, weight], ...]). Output under $PROBE_DIR/NAME (default demo_probes_out/NAME);
prints one line per seed (accuracies, NFR, flips, the adapter's best validation loss against the
CE control's) and the per-op accuracies."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from muscle_fast.train import demo as d

ROOT = os.environ.get("PROBE_DIR", "demo_probes_out")


def config(over: dict) -> d.DemoConfig:
    over = dict(over)
    specs = {}
    for name, default in (("v1", d.V1), ("v2", d.V2)):
        o = dict(over.pop(name, {}))
        if "mix" in o:
            o["mix"] = tuple((op, float(w)) for op, w in o["mix"])
        specs[name] = replace(default, **o)
    return replace(d.DemoConfig(), **specs, **over)


def main(name: str, seeds: list[int], over: dict) -> None:
    cfg = replace(config(over), rows=("ce_control",))
    t = time.perf_counter()
    res = d.run_demo(f"{ROOT}/{name}", seeds, cfg=cfg, quiet=True)
    det = json.loads(Path(f"{ROOT}/{name}/details.json").read_text())
    for s, dd in zip(res["seeds"], det["seeds"]):
        m, c, po = s["models"], dd["checks"], dd["per_op_acc"]
        ok = (c["v2_better"] and c["nfr_ge_4pct"] and c["negative_flips_ge_100"]
              and c["adapter_converged"])
        print(f"{name} seed {s['seed']}: v1 {100 * m['v1']['acc']:.2f} "
              f"v2 {100 * m['v2']['acc']:.2f} "
              f"NFR {100 * m['v2']['nfr']:.2f} flips {m['v2']['n_negative_flips']} "
              f"best {c['v2_adapter_best_val_loss']:.3f} ce {c['ce_control_val_loss']:.3f} ok={ok} "
              f"v1steps {dd['bases']['v1']['steps_run']} v2steps {dd['bases']['v2']['steps_run']} "
              f"v2runs {len(dd['bases']['v2']['runs'])}")
        print("   per-op v1/v2: " + " ".join(
            f"{op} {100 * po[op]['v1']:.0f}/{100 * po[op]['v2']:.0f}" for op in d.OPS))
    print(f"{name}: wall {time.perf_counter() - t:.0f} s, cpu {det['cpu_s']} s")


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2].split(",")],
         json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
