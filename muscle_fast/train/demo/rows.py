"""Step 4 of the demo: the compatibility rows. Each is a trainable copy of the v2 task adapter
on v2, trained with ``compat_training_step`` on the train split (the same batches for every
row): MUSCLE (``mask="muscle"``), the same from a teacher cache (``hidden``: exact; ``topk``:
an approximation), the paper's ablations (``old_correct``; plain KD from v1, ``all_old``; the
likelihood masks with CE, as in its Table 7) and the CE control (the same loop with
``kl_weight=0, ce_weight=1``: the v2 task adapter trained further on the labels), at the same
steps and at four times the steps."""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from .adapters import val_loss
from .bases import progress
from .setting import CACHE_ROWS, DemoConfig, collate

# the rows trained with CE beside the masked KL (the paper's Table 7 likelihood rows)
WITH_CE = ("token_likelihood", "sequence_likelihood")


def row_steps(cfg: DemoConfig, row: str) -> int:
    return 4 * cfg.compat_steps if row == "ce_control_4x" else cfg.compat_steps


def row_args(row: str, cfg: DemoConfig):
    """The ``CompatArguments`` of a row."""
    from muscle_fast.train import CompatArguments

    if row in ("ce_control", "ce_control_4x"):  # the same loop and loss call, CE only
        return CompatArguments(mask="all_old", temperature=cfg.temperature, kl_weight=0.0,
                               ce_weight=1.0)
    if row in CACHE_ROWS:  # MUSCLE, its teachers read from the cache
        return CompatArguments(mask="muscle", temperature=cfg.temperature)
    return CompatArguments(mask=row, temperature=cfg.temperature,
                           ce_weight=1.0 if row in WITH_CE else 0.0)


def build_row_cache(cfg: DemoConfig, kind: str, paths: dict, tok, train, directory) -> dict:
    """The teacher cache of a ``CACHE_ROWS`` row: ``build_teacher_cache`` run with the seed's v1
    and v2 task models over the train rows (rebuilt from scratch in ``directory``). Returns its
    kind, k, build seconds and bytes per token."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from muscle_fast.train import build_teacher_cache

    def task_model(name: str):
        base = LlamaForCausalLM.from_pretrained(paths[name])
        return PeftModel.from_pretrained(base, str(paths[f"adapter_{name}"])).eval()

    k = cfg.cache_topk_k if kind == "topk" else None
    t0 = time.perf_counter()
    cache = build_teacher_cache(directory, train, old_model=task_model("v1"),
                                new_model=task_model("v2"), kind=kind, k=k,
                                temperature=cfg.temperature, tokenizer=tok, overwrite=True,
                                progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - t0
    m = cache.manifest
    return {"kind": kind, "k": k, "build_s": round(seconds, 2), "n_tokens": m["n_tokens"],
            "bytes_per_token": sum(sh["bytes"] for sh in m["shards"]) / m["n_tokens"]}


def train_compat_row(cfg: DemoConfig, row: str, paths: dict, tok, train, val, quiet: bool,
                     cache_dir=None):
    """One compatibility adapter (from the v2 task adapter), trained with
    ``compat_training_step`` on the train split; every row draws the same batches (a longer row
    draws more of the same sequence). A ``CACHE_ROWS`` row first builds its teacher cache in
    ``cache_dir`` and then trains the student alone (no v1 body loaded) from it. Returns
    ``(model, log, val_loss, cache_info)`` (``cache_info`` None for a live row); the log has
    the loss statistics of the first step and of about every fifth of the run."""
    from muscle_fast.train import (
        build_cached_compat_model,
        build_compat_model,
        compat_training_step,
    )

    args = row_args(row, cfg)
    cache_info = None
    if row in CACHE_ROWS:
        cache_info = build_row_cache(cfg, CACHE_ROWS[row], paths, tok, train, cache_dir)
        model = build_cached_compat_model(str(paths["v2"]), str(paths["adapter_v2"]),
                                          str(cache_dir), tokenizer=tok)
        args = replace(args, teacher_cache=str(cache_dir))
    else:
        model = build_compat_model(str(paths["v2"]), str(paths["adapter_v2"]), str(paths["v1"]),
                                   str(paths["adapter_v1"]), old_tokenizer=tok, new_tokenizer=tok)
    opt = torch.optim.AdamW(model.compat_parameters(), lr=cfg.compat_lr)  # constant lr
    g = torch.Generator().manual_seed(cfg.seed * 100 + 21)
    steps = row_steps(cfg, row)
    log, bar = [], progress(steps, f"seed {cfg.seed}: compat adapter {row}", quiet)
    for step in range(1, steps + 1):
        idx = torch.randint(len(train), (cfg.compat_batch,), generator=g).tolist()
        stats = compat_training_step(model, collate([train[i] for i in idx]), opt, args)
        bar.update(), bar.set_postfix(loss=f"{stats['loss']:.4f}",
                                      to_old=f"{stats['frac_to_old']:.2f}")
        if step == 1 or step % max(1, steps // 5) == 0 or step == steps:
            log.append({"step": step, **stats})
    bar.close()
    return model, log, val_loss(model.student, collate(val)), cache_info
