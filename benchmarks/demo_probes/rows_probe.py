"""Compatibility-row variants on the bases and task adapters of a finished probe (or demo) run:
trains the given rows again with DemoConfig overrides (e.g. other compat steps or lr) and prints
each row's d%NFR_c / dacc_c against that run's v1 and v2 task models. Runs nothing else.

    python benchmarks/demo_probes/rows_probe.py DIR SEEDS OVERRIDES_JSON VARIANTS_JSON ROWS

DIR: the run's output folder; OVERRIDES_JSON: the run's own DemoConfig overrides (as given to
probe.py); VARIANTS_JSON: a list of further overrides, one variant each; ROWS: comma-separated."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from probe import config

from muscle_fast.train.demo import run as R
from muscle_fast.train.demo.report import row_metrics
from muscle_fast.train.demo.rows import train_compat_row
from muscle_fast.train.demo.setting import build_tokenizer, split_items, task_answer, task_rows


def main(root: str, seeds: list[int], over: dict, variants: list[dict], rows: list[str]) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    base_cfg = config(over)
    tok = build_tokenizer()
    for seed in seeds:
        cfg0 = replace(base_cfg, seed=seed)
        job = R._Job(Path(root), cfg0, "compat", "muscle", True)
        paths = {"v1": job.base_path("v1"), "v2": job.base_path("v2"),
                 "adapter_v1": job.run_dir / "adapter_v1", "adapter_v2": job.run_dir / "adapter_v2"}
        test, train_items, val_items = split_items(cfg0)
        labels = np.array([task_answer(it, cfg0) for it in test])
        res = {}
        for name in ("v1", "v2"):
            m = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(paths[name]),
                                          str(paths[f"adapter_{name}"])).eval()
            p = R.predict(m, tok, test, cfg0.answer_len)
            res[name] = ((p == labels).all(1), [" ".join(map(str, x)) for x in p])
        o, po = res["v1"]
        v2 = row_metrics(o, po, *res["v2"])
        print(f"{root} seed {seed}: v1 {100 * o.mean():.1f} v2 {100 * v2['acc']:.1f} "
              f"NFR {100 * v2['nfr']:.1f}", flush=True)
        for var in variants:
            cfg = replace(cfg0, **var)
            train, val = task_rows(tok, train_items, cfg), task_rows(tok, val_items, cfg)
            parts = []
            for row in rows:
                model, log, _, _ = train_compat_row(cfg, row, paths, tok, train, val, True)
                p = R.predict(model.student, tok, test, cfg.answer_len)
                m = row_metrics(o, po, (p == labels).all(1), [" ".join(map(str, x)) for x in p])
                parts.append(f"{row} {100 * (m['nfr'] - v2['nfr']) / v2['nfr']:+.1f}/"
                             f"{100 * (m['acc'] - v2['acc']):+.1f}")
            print(f"   {json.dumps(var)}: " + " ".join(parts), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2].split(",")], json.loads(sys.argv[3]),
         json.loads(sys.argv[4]), sys.argv[5].split(","))
