"""Effect of the teacher cache on the demo's outcome: for each seed of a finished demo run
(``muscle-fast demo --out DIR``), the MUSCLE compatibility adapter trained as the demo trains it
(same bases, task adapters, batches, lr, steps) with live teachers, from a ``hidden`` cache and
from a ``topk`` cache; accuracy and negative flips (NFR) against the old task model on the seed's
test items, beside the demo's own MUSCLE row. Also the cache build time and size per seed.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_teacher_cache_effect.py --demo DIR [--k 128]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.harness import env_info, load1


def run_seed(demo_dir: str, seed: int, k: int, tmp: str) -> list[dict]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from muscle_fast.train import (
        CompatArguments,
        build_cached_compat_model,
        build_compat_model,
        build_teacher_cache,
        compat_training_step,
    )
    from muscle_fast.train.demo import run as D
    from muscle_fast.train.demo import setting as S

    cfg = S.DemoConfig(seed=seed)
    job = D._Job(Path(demo_dir), cfg, "compat", "muscle", True)
    paths = {"v1": job.base_path("v1"), "v2": job.base_path("v2"),
             "adapter_v1": job.run_dir / "adapter_v1", "adapter_v2": job.run_dir / "adapter_v2"}
    tok = S.build_tokenizer()
    test, train_items, _ = S.split_items(cfg)
    train = S.task_rows(tok, train_items, cfg)
    labels = np.array([S.task_answer(it, cfg) for it in test])
    old = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(paths["v1"]),
                                    str(paths["adapter_v1"])).eval()
    new = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(paths["v2"]),
                                    str(paths["adapter_v2"])).eval()
    old_correct = (D.predict(old, tok, test, cfg.answer_len) == labels).all(1)
    new_correct = (D.predict(new, tok, test, cfg.answer_len) == labels).all(1)
    caches = {}
    for kind in ("hidden", "topk"):
        d = os.path.join(tmp, f"seed{seed}_{kind}")
        t0 = time.perf_counter()
        c = build_teacher_cache(d, train, old_model=old, new_model=new, kind=kind,
                                k=k if kind == "topk" else None, temperature=cfg.temperature,
                                progress=False, log=lambda *_: None)
        caches[kind] = (d, time.perf_counter() - t0,
                        sum(s["bytes"] for s in c.manifest["shards"]) / c.manifest["n_tokens"])
    del old, new
    out = []
    for variant in ("live", "hidden", "topk"):
        if variant == "live":
            model = build_compat_model(str(paths["v2"]), str(paths["adapter_v2"]),
                                       str(paths["v1"]), str(paths["adapter_v1"]))
            args = CompatArguments(mask="muscle", temperature=cfg.temperature)
        else:
            model = build_cached_compat_model(str(paths["v2"]), str(paths["adapter_v2"]),
                                              caches[variant][0])
            args = CompatArguments(mask="muscle", temperature=cfg.temperature,
                                   teacher_cache=caches[variant][0])
        opt = torch.optim.AdamW(model.compat_parameters(), lr=cfg.compat_lr)
        g = torch.Generator().manual_seed(cfg.seed * 100 + 21)  # the demo's batches
        t0 = time.process_time()
        for _ in range(cfg.compat_steps):
            idx = torch.randint(len(train), (cfg.compat_batch,), generator=g).tolist()
            compat_training_step(model, S.collate([train[i] for i in idx]), opt, args)
        cpu = time.process_time() - t0
        correct = (D.predict(model.student, tok, test, cfg.answer_len) == labels).all(1)
        row = {"bench": "teacher_cache_effect", "seed": seed, "variant": variant,
               "k": k if variant == "topk" else None, "acc": float(correct.mean()),
               "nfr": float(np.mean(old_correct & ~correct)),
               "nfr_v2": float(np.mean(old_correct & ~new_correct)),
               "acc_v1": float(old_correct.mean()), "acc_v2": float(new_correct.mean()),
               "train_cpu_s": cpu, "n_test": len(test), "steps": cfg.compat_steps}
        if variant != "live":
            row.update(cache_build_s=caches[variant][1], cache_bytes_per_token=caches[variant][2])
        out.append(row)
        print(json.dumps({k_: v for k_, v in row.items()}), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="the --out folder of a finished demo run")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seeds of the demo run (default: the demo's default seeds)")
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "teacher_cache_effect.jsonl"))
    args = ap.parse_args(argv)
    if args.seeds is None:
        from muscle_fast.train.demo import DEFAULT_SEEDS

        args.seeds = list(DEFAULT_SEEDS)
    torch.set_num_threads(1)
    demo = json.load(open(os.path.join(args.demo, "results.json")))  # noqa: SIM115
    env = env_info(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.seeds:
            rows += [dict(r, load1=load1(), **env) for r in run_seed(args.demo, s, args.k, tmp)]
    with open(args.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(json.dumps(demo)[:2000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
