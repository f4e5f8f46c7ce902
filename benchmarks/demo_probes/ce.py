"""CE-control variants (e.g. other compatibility lrs) on the bases and task adapters of an earlier
``setting.py`` probe; no MUSCLE row. Prints each variant's validation loss after the control's
steps against the v2 adapter's best ("LOWER": more CE improved it, issue 17's item 2 fails).

    python benchmarks/demo_probes/ce.py NAME SEEDS VARIANTS_JSON [OVERRIDES_JSON]

VARIANTS_JSON: a list of DemoConfig overrides, e.g. '[{"compat_lr": 1e-3}]'; OVERRIDES_JSON:
the probe's own overrides, as given to setting.py."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from muscle_fast.train import demo as d

sys.path.insert(0, str(Path(__file__).parent))
from setting import ROOT, config


def main(name: str, seeds: list[int], variants: list[dict], over: dict) -> None:
    torch.set_num_threads(1)
    out = Path(ROOT) / name
    det = {s["seed"]: s for s in json.loads(Path(out / "details.json").read_text())["seeds"]}
    tok = d.build_tokenizer()
    for seed in seeds:
        best = det[seed]["task_adapters"]["v2"]["best_val_loss"]
        parts = []
        for v in variants:
            cfg = replace(config(over), seed=seed, **v)
            job = d._Job(out, cfg, "compat", "ce_control", True)
            _, train, val = d.split_items(cfg)
            paths = {"v1": job.base_path("v1"), "v2": job.base_path("v2"),
                     "adapter_v1": job.run_dir / "adapter_v1",
                     "adapter_v2": job.run_dir / "adapter_v2"}
            _, _, vl = d.train_compat_row(cfg, "ce_control", paths, tok, d.task_rows(tok, train),
                                          d.task_rows(tok, val), True)
            parts.append(f"{v} {vl:.3f}{'' if vl >= best else ' LOWER'}")
        print(f"seed {seed} best {best:.3f}: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2].split(",")], json.loads(sys.argv[3]),
         json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
