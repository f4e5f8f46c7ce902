"""``muscle-fast demo``: a real model update on tiny transformers + peft models, end to end.

1. Two tiny Llama bases with one shared tokenizer, pre-trained here on a synthetic corpus of
   digit operations (``op a b c = r``). The update is a new pre-training run, not v1 continued:
   v2 has its own initialisation, a new corpus mix (it adds the arithmetic ops ``add`` and
   ``add2``, which v1's corpus lacks, and drops two ops v1 saw, ``max`` and ``min``) and more
   pre-training compute: v1 has a fixed budget of 450 steps; v2 trains until its loss on a
   held-out sample of its own corpus is within 0.01 nats/token of that corpus' entropy floor
   (checked every 150 steps, at most 1800 steps; pre-training data only); a run still on a
   plateau at 1800 steps is a failed run and is started once more from a new init. Bases are
   cached in the output directory.
2. A downstream task in a format the bases never saw (``Q op a b c A r``), over all six ops; a
   LoRA task adapter is trained on each base on the train split and kept at its best
   validation loss (as the paper does): the lr decays linearly to 0 over a fixed budget, the
   validation loss is measured about once per epoch, and of two inits the better is kept.
3. Old (v1 + adapter) and new (v2 + adapter) task models are evaluated on held-out test items
   disjoint from train and validation: accuracy, negative and positive flips.
4. Compatibility adapters, each a trainable copy of the v2 task adapter on v2, are trained with
   ``compat_training_step`` (the fused-linear loss from hidden states, by default) on the train
   split, one per row: ``muscle``, ``old_correct``, plain KD
   (``all_old``), and the CE control (the same loop with ``kl_weight=0, ce_weight=1``: the v2
   task adapter trained further with cross-entropy only; same steps, lr, batches). Two more
   rows train MUSCLE from a teacher cache (``build_teacher_cache`` over the train rows, the
   student alone): ``hidden`` (exact: equals the live MUSCLE row) and ``topk`` with k=4 of the
   22 tokens (an approximation).
5. Several seeds in one command: three phases (bases, task adapters, compatibility rows), each
   phase's units over all seeds in parallel processes; a table per seed, a summary over seeds,
   ``results.json``, ``details.json`` and ``flips.png``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

OPS = ("first", "last", "max", "min", "add", "add2")
DIGITS = tuple(str(d) for d in range(10))
SPECIAL = ("<pad>", "<bos>", "<eos>", "=", "Q", "A")
# k of the ``topk`` teacher-cache row: a real cut of the demo's 22-token vocabulary
CACHE_TOPK_K = 4
# MUSCLE trained from a teacher cache (issue 24) built from the same v1/v2 task models over the
# train rows: ``hidden`` is exact (the same loss as the live row), ``topk`` an approximation
CACHE_ROWS = {"muscle_cache_hidden": "hidden", "muscle_cache_topk": "topk"}
# the rows of the table, in order; the compatibility rows are trained from the v2 task adapter
COMPAT_ROWS = ("muscle", *CACHE_ROWS, "old_correct", "all_old", "ce_control")
ROW_NAMES = {"v1": "v1 (old task model)", "v2": "v2 (new task model)",
             "muscle": "MUSCLE (mask=muscle)",
             "muscle_cache_hidden": "MUSCLE (cache: hidden)",
             "muscle_cache_topk": f"MUSCLE (cache: topk, k={CACHE_TOPK_K})",
             "old_correct": "mask=old_correct", "all_old": "plain KD (all_old)",
             "ce_control": "CE control"}
# design F; fixed before any design was run on them (DEMO_RESULTS.md)
DEFAULT_SEEDS = (24, 25, 26)


def _op(op: str, a: int, b: int, c: int) -> int:
    if op == "first":
        return a
    if op == "last":
        return c
    if op == "max":
        return max(a, b, c)
    if op == "min":
        return min(a, b, c)
    if op == "add":
        return (a + b + c) % 10
    if op == "add2":  # ignores c: a 100-entry table
        return (a + b) % 10
    raise ValueError(op)


@dataclass(frozen=True)
class BaseSpec:
    """One pre-trained base: its size, its pre-training steps and its corpus mix (op weights)."""

    hidden: int
    intermediate: int
    steps: int  # a fixed budget; with ``converge_tol``, the most steps the run may take
    mix: tuple  # ((op, weight), ...); ops with weight 0 never occur in the corpus
    layers: int = 2
    heads: int = 4
    # None: train exactly ``steps``. A number: every ``check_every`` steps, measure the loss on a
    # held-out sample of the base's own corpus; stop once it is within ``converge_tol``
    # nats/token of that sample's entropy floor (the loss of a model that knows every op of
    # its mix); keep the checkpoint with the lowest held-out loss.
    converge_tol: float | None = None
    check_every: int = 150
    # with ``converge_tol``: a run not converged after ``steps`` is restarted from a new init,
    # at most this many runs in all (the one with the lowest held-out loss is kept)
    max_runs: int = 1


# v1's corpus has no arithmetic; v2's adds it (twice the weight of the other ops) and drops
# max and min
V1 = BaseSpec(hidden=64, intermediate=192, steps=450,
              mix=(("first", 1.0), ("last", 1.0), ("max", 1.0), ("min", 1.0), ("add", 0.0),
                   ("add2", 0.0)))
V2 = BaseSpec(hidden=64, intermediate=192, steps=1800, converge_tol=0.01, max_runs=2,
              mix=(("first", 1.0), ("last", 1.0), ("max", 0.0), ("min", 0.0), ("add", 2.0),
                   ("add2", 2.0)))


@dataclass
class DemoConfig:
    """Everything that decides one seed's numbers."""

    seed: int = 0
    v1: BaseSpec = V1
    v2: BaseSpec = V2
    pre_batch: int = 128
    pre_lr: float = 1e-3
    n_pool: int = 600  # task training pool, split train/val
    val_frac: float = 0.2
    n_test: int = 3000
    lora_r: int = 8
    task_batch: int = 64
    task_lr: float = 2e-3
    # the lr decays linearly from task_lr to 0 over task_steps; the validation loss is measured
    # every task_eval_every steps and the checkpoint with the lowest one is kept
    task_steps: int = 1000
    task_eval_every: int = 8  # about one epoch of the train split (480 items, batch 64)
    task_inits: int = 2  # adapter inits per base; the one with the lower best val loss is kept
    compat_steps: int = 100
    compat_batch: int = 64
    compat_lr: float = 5e-4  # constant
    temperature: float = 2.0
    cache_topk_k: int = CACHE_TOPK_K  # k of the ``muscle_cache_topk`` row
    rows: Sequence[str] = COMPAT_ROWS

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        return cls(seed=seed, v1=replace(V1, hidden=32, intermediate=64, steps=60),
                   v2=replace(V2, hidden=32, intermediate=64, steps=80, check_every=40,
                              max_runs=1),
                   n_pool=320, n_test=256, task_steps=40, task_eval_every=10, compat_steps=8,
                   task_batch=32, compat_batch=32)


# ---------------------------------------------------------------- data


def build_tokenizer():
    """One word-level tokenizer shared by v1 and v2 (MUSCLE's requirement)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + DIGITS + OPS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


def _items(rng: np.random.Generator, n: int, exclude=frozenset()) -> list[tuple]:
    """n distinct (op, a, b, c) task items, ops uniform, none in exclude."""
    out, seen = [], set(exclude)
    while len(out) < n:
        it = (OPS[rng.integers(len(OPS))], *map(int, rng.integers(0, 10, 3)))
        if it not in seen:
            seen.add(it)
            out.append(it)
    return out


def split_items(cfg: DemoConfig) -> tuple[list, list, list]:
    """(test, train, val): disjoint; train/val is the pool split (1 - val_frac) / val_frac."""
    rng = np.random.default_rng(cfg.seed)
    test = _items(rng, cfg.n_test)
    pool = _items(rng, cfg.n_pool, exclude=frozenset(test))
    n_val = round(cfg.val_frac * cfg.n_pool)
    return test, pool[n_val:], pool[:n_val]


def _encode(tok, texts: list[str]) -> torch.Tensor:
    return torch.tensor(tok(texts, add_special_tokens=True)["input_ids"], dtype=torch.long)


def _pretrain_text(it) -> str:
    op, a, b, c = it
    return f"{op} {a} {b} {c} = {_op(op, a, b, c)} <eos>"


def _task_prompt(it) -> str:
    op, a, b, c = it
    return f"Q {op} {a} {b} {c} A"


def task_rows(tok, items) -> list[dict]:
    """Task examples for training: the loss sees only the answer token, the last one. Nothing
    follows it: a trailing ``<eos>`` would carry no label and, under causal attention, cannot
    change the answer's logits, so it would only cost compute."""
    ids = _encode(tok, [f"{_task_prompt(it)} {_op(*it)}" for it in items])
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]  # the answer digit
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": l}
            for i, l in zip(ids, labels)]


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------- models


def _tiny_llama(spec: BaseSpec, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads, max_position_embeddings=16, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)


def _corpus_items(rng: np.random.Generator, spec: BaseSpec, n: int) -> list[tuple]:
    """n pre-training items, each op drawn with the mix's weights, then its three digits.

    Per item this draws exactly what ``rng.choice(len(ops), p=p)`` followed by
    ``rng.integers(0, 10, 3)`` draws (one uniform, searched in the normalised cdf), without
    ``choice``'s per-call argument checks, which cost as much as the rest of the batch."""
    ops = [o for o, w in spec.mix if w > 0]
    p = np.array([w for _, w in spec.mix if w > 0], dtype=float)
    p /= p.sum()
    cdf = p.cumsum()
    cdf /= cdf[-1]
    out = []
    for _ in range(n):
        op = ops[int(cdf.searchsorted(rng.random(), side="right"))]
        out.append((op, *map(int, rng.integers(0, 10, 3))))
    return out


def _encode_pretrain(tok, items: list[tuple]) -> torch.Tensor:
    """Token ids of the pre-training texts of ``items``: what ``_encode`` gives for
    ``_pretrain_text`` (every token is a whole word of the vocabulary), without the tokenizer."""
    vocab = tok.get_vocab()
    bos, eq, eos = vocab["<bos>"], vocab["="], vocab["<eos>"]
    digit = [vocab[d] for d in DIGITS]
    return torch.tensor([[bos, vocab[op], digit[a], digit[b], digit[c], eq, digit[_op(op, a, b, c)],
                          eos] for op, a, b, c in items], dtype=torch.long)


def corpus_floor(spec: BaseSpec, items: list[tuple]) -> float:
    """The causal-LM loss per predicted token that a model knowing every op of ``spec``'s mix
    gets on ``items`` (pre-training format): the op token costs -log p(op), each of the three
    digits log 10, and ``=``, the answer and ``<eos>`` nothing; 7 predicted tokens each."""
    w = dict(spec.mix)
    total = sum(w.values())
    nats = sum(-math.log(w[it[0]] / total) + 3 * math.log(10) for it in items)
    return nats / (7 * len(items))


def _pretrain_run(spec: BaseSpec, cfg: DemoConfig, tok, seed: int, held_ids, floor: float,
                  quiet: bool, desc: str):
    """One pre-training run from the init and data order of ``seed``; see ``pretrain_base``."""
    model = _tiny_llama(spec, len(tok), seed)
    model.train()
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pre_lr, weight_decay=0.01)
    curve, best = [], None
    bar = _progress(spec.steps, desc, quiet)
    step = 0
    while step < spec.steps:
        ids = _encode_pretrain(tok, _corpus_items(rng, spec, cfg.pre_batch))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(), bar.set_postfix(loss=f"{loss.item():.3f}")
        if spec.converge_tol is not None and (step % spec.check_every == 0 or step == spec.steps):
            with torch.no_grad():
                model.eval()
                held_loss = float(model(input_ids=held_ids, labels=held_ids).loss)
                model.train()
            curve.append((step, held_loss))
            if best is None or held_loss < best[0]:
                best = (held_loss, step, {k: v.detach().clone()
                                          for k, v in model.state_dict().items()})
            if held_loss - floor <= spec.converge_tol:
                break
    bar.close()
    info = {"seed": seed, "steps_run": step, "kept_step": step, "held_out_curve": curve,
            "floor": floor, "converged": None}
    if best is not None:
        model.load_state_dict(best[2])
        info.update(kept_step=best[1], held_out_loss=best[0],
                    converged=best[0] - floor <= spec.converge_tol)
    return model, info


def pretrain_base(spec: BaseSpec, cfg: DemoConfig, tok, seed: int, quiet: bool):
    """Causal-LM pre-training on the synthetic corpus, ops drawn with the spec's mix.

    With ``spec.converge_tol``, the run is checked every ``spec.check_every`` steps on a held-out
    sample of its own corpus (1024 sequences from a separate generator; pre-training data only)
    and stops once the held-out loss is within ``converge_tol`` of the sample's entropy floor, or
    after ``spec.steps``; the checkpoint with the lowest held-out loss is kept. A run that has
    not converged by ``spec.steps`` is a failed run (a plateau it did not leave): it is started
    again from a new init and data order (``seed + 1000 k``), at most ``spec.max_runs`` runs in
    all, and the run with the lowest held-out loss is returned. Only pre-training data decides.

    Returns ``(model, info)``; info = the kept run's steps, kept step, held-out curve and floor,
    plus ``runs`` (every run's seed, steps and held-out loss)."""
    held = _corpus_items(np.random.default_rng([seed, 7]), spec, 1024)
    held_ids = _encode(tok, [_pretrain_text(it) for it in held])
    floor = corpus_floor(spec, held)
    kept, runs = None, []
    for k in range(spec.max_runs if spec.converge_tol is not None else 1):
        desc = f"pre-train base (run {k + 1}, up to {spec.steps} steps)"
        model, info = _pretrain_run(spec, cfg, tok, seed + 1000 * k, held_ids, floor, quiet, desc)
        runs.append({key: info.get(key) for key in ("seed", "steps_run", "kept_step",
                                                     "held_out_loss", "converged")})
        if kept is None or info["held_out_loss"] < kept[1]["held_out_loss"]:
            kept = (model, info)
        if info["converged"] is not False:
            break
    model, info = kept
    info["runs"] = runs
    return model.eval(), info


@torch.no_grad()
def _val_loss(model, val_batch: dict) -> float:
    was = model.training
    model.eval()
    loss = float(model(**val_batch).loss)
    model.train(was)
    return loss


def train_task_adapter(cfg: DemoConfig, base, train, val, seed: int, quiet: bool, desc: str):
    """A LoRA task adapter trained with cross-entropy on the answer token, AdamW with the lr
    decaying linearly from ``task_lr`` to 0 over ``task_steps`` steps (the transformers
    Trainer's default schedule), evaluated on the validation split every ``task_eval_every``
    steps and returned at its best validation loss (the paper's "best epoch by validation
    loss"). Selection uses the validation split only.

    Returns ``(model, info)``, info = the seed, best step, best validation loss, the curve."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(
        r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=cfg.task_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / cfg.task_steps)
    g = torch.Generator().manual_seed(seed)
    val_batch = _collate(val)
    best = (_val_loss(model, val_batch), 0, {n: p.detach().clone() for n, p in params.items()})
    curve = [(0, best[0])]
    bar = _progress(cfg.task_steps, desc, quiet)
    for step in range(1, cfg.task_steps + 1):
        idx = torch.randint(len(train), (cfg.task_batch,), generator=g).tolist()
        loss = model(**_collate([train[i] for i in idx])).loss
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        bar.update(), bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.task_eval_every == 0 or step == cfg.task_steps:
            v = _val_loss(model, val_batch)
            curve.append((step, v))
            if v < best[0]:
                best = (v, step, {n: p.detach().clone() for n, p in params.items()})
    bar.close()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best[2][n])
    info = {"seed": seed, "best_step": best[1], "best_val_loss": best[0], "val_curve": curve}
    return model.eval(), info


@torch.no_grad()
def predict(model, tok, items, batch: int = 1024) -> np.ndarray:
    """The task answer: argmax over the ten digit tokens at the answer position."""
    digit_ids = torch.tensor(tok.convert_tokens_to_ids(list(DIGITS)))
    was = model.training
    model.eval()
    preds = []
    for s in range(0, len(items), batch):
        ids = _encode(tok, [_task_prompt(it) for it in items[s:s + batch]])
        logits = model(input_ids=ids).logits[:, -1, digit_ids]
        preds.append(logits.argmax(-1))
    model.train(was)
    return torch.cat(preds).numpy()


def _base_key(spec: BaseSpec, cfg: DemoConfig, seed: int) -> str:
    blob = json.dumps({"spec": asdict(spec), "pre_batch": cfg.pre_batch, "pre_lr": cfg.pre_lr,
                       "seed": seed, "vocab": SPECIAL + DIGITS + OPS})
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- the three phases


def _row_args(row: str, cfg: DemoConfig):
    from muscle_fast.train import CompatArguments

    if row == "ce_control":  # the same loop and loss call, cross-entropy only
        return CompatArguments(mask="all_old", temperature=cfg.temperature, kl_weight=0.0,
                               ce_weight=1.0)
    if row in CACHE_ROWS:  # MUSCLE, its teachers read from the cache
        return CompatArguments(mask="muscle", temperature=cfg.temperature)
    return CompatArguments(mask=row, temperature=cfg.temperature)


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
    ``compat_training_step`` on the train split; every row sees the same batches. A
    ``CACHE_ROWS`` row first builds its teacher cache in ``cache_dir`` and then trains the
    student alone (no v1 body loaded) from it. Returns ``(model, log, val_loss, cache_info)``
    (``cache_info`` None for a live row)."""
    from muscle_fast.train import (
        build_cached_compat_model,
        build_compat_model,
        compat_training_step,
    )

    args = _row_args(row, cfg)
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
    log, bar = [], _progress(cfg.compat_steps, f"seed {cfg.seed}: compat adapter {row}", quiet)
    for step in range(1, cfg.compat_steps + 1):
        idx = torch.randint(len(train), (cfg.compat_batch,), generator=g).tolist()
        stats = compat_training_step(model, _collate([train[i] for i in idx]), opt, args)
        bar.update(), bar.set_postfix(loss=f"{stats['loss']:.4f}",
                                      to_old=f"{stats['frac_to_old']:.2f}")
        if step % max(1, cfg.compat_steps // 5) == 0 or step == cfg.compat_steps:
            log.append({"step": step, **stats})
    bar.close()
    val_loss = _val_loss(model.student, _collate(val))
    return model, log, val_loss, cache_info


class _Job:
    """One unit of work of one seed (a base, a task adapter, a compatibility row), run in this
    process or a worker; one thread each: tiny matmuls gain nothing from intra-op threads, and
    OpenMP threads stall badly on shared cores, so the units run in parallel processes instead."""

    def __init__(self, out: Path, cfg: DemoConfig, kind: str, name: str, quiet: bool):
        self.out, self.cfg, self.kind, self.name, self.quiet = out, cfg, kind, name, quiet

    @property
    def run_dir(self) -> Path:
        return self.out / f"run_seed{self.cfg.seed}"

    def base_path(self, name: str) -> Path:
        spec = getattr(self.cfg, name)
        return self.out / "cache" / f"base_{name}_{_base_key(spec, self.cfg, self._base_seed(name))}"

    def _base_seed(self, name: str) -> int:
        return self.cfg.seed * 100 + (1 if name == "v1" else 2)

    def __call__(self) -> dict:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t, cpu = time.perf_counter(), time.process_time()
        try:
            out = getattr(self, f"_{self.kind}")()
        finally:
            torch.set_num_threads(threads)
        return {**out, "seconds": round(time.perf_counter() - t, 1),
                "cpu_s": round(time.process_time() - cpu, 1)}

    def _base(self) -> dict:
        path = self.base_path(self.name)
        info_file = path / "pretrain_info.json"  # written last: a base is cached once it exists
        if info_file.exists():
            return {"path": str(path), "cached": True,
                    "info": json.loads(info_file.read_text())}
        tok = build_tokenizer()
        model, info = pretrain_base(getattr(self.cfg, self.name), self.cfg, tok,
                                    self._base_seed(self.name), self.quiet)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        info_file.write_text(json.dumps(info))
        return {"path": str(path), "cached": False, "info": info}

    def _adapter(self) -> dict:
        from transformers import LlamaForCausalLM

        tok = build_tokenizer()
        test, train_items, val_items = split_items(self.cfg)
        train, val = task_rows(tok, train_items), task_rows(tok, val_items)
        kept, inits = None, []
        for k in range(self.cfg.task_inits):  # a fresh base each: peft wraps it in place
            base = LlamaForCausalLM.from_pretrained(self.base_path(self.name)).eval()
            seed = self.cfg.seed * 100 + (11 if self.name == "v1" else 12) + 100_000 * k
            model, info = train_task_adapter(
                self.cfg, base, train, val, seed, self.quiet,
                f"seed {self.cfg.seed}: task adapter on {self.name} (init {k + 1})")
            inits.append({key: info[key] for key in ("seed", "best_step", "best_val_loss")})
            if kept is None or info["best_val_loss"] < kept[1]["best_val_loss"]:
                kept = (model, info)
        model, info = kept
        info["inits"] = inits
        model.save_pretrained(self.run_dir / f"adapter_{self.name}")
        labels = np.array([_op(*it) for it in test])
        return {"info": info, "correct": predict(model, tok, test) == labels}

    def _compat(self) -> dict:
        tok = build_tokenizer()
        test, train_items, val_items = split_items(self.cfg)
        paths = {"v1": self.base_path("v1"), "v2": self.base_path("v2"),
                 "adapter_v1": self.run_dir / "adapter_v1",
                 "adapter_v2": self.run_dir / "adapter_v2"}
        cache_dir = (self.run_dir / f"teacher_cache_{CACHE_ROWS[self.name]}"
                     if self.name in CACHE_ROWS else None)
        model, log, val_loss, cache_info = train_compat_row(
            self.cfg, self.name, paths, tok, task_rows(tok, train_items),
            task_rows(tok, val_items), self.quiet, cache_dir)
        model.save_pretrained(self.run_dir / f"compat_{self.name}")
        labels = np.array([_op(*it) for it in test])
        return {"train_log": log, "val_loss": val_loss, "cache": cache_info,
                "correct": predict(model.student, tok, test) == labels}


def _call(job: _Job) -> dict:
    return job()


def _rates(old: np.ndarray, new: np.ndarray) -> dict:
    return {"acc": float(new.mean()), "nfr": float(np.mean(old & ~new)),
            "pfr": float(np.mean(~old & new))}


def seed_checks(models: dict, n_test: int, v2_best_val: float, ce_val: float | None) -> dict:
    """Issue 17's per-seed conditions on the setting (not on MUSCLE): a real update (v2 more
    accurate than v1, NFR >= 4 %, >= 100 negative flips, >= 3000 held-out items) and a converged
    v2 task adapter (the CE control, i.e. the adapter trained further with cross-entropy, does
    not get a lower validation loss than the adapter's best)."""
    v1, v2 = models["v1"], models["v2"]
    return {"v2_better": v2["acc"] > v1["acc"], "nfr_ge_4pct": v2["nfr"] >= 0.04,
            "negative_flips_ge_100": v2["n_negative_flips"] >= 100, "n_test_ge_3000": n_test >= 3000,
            "v2_adapter_best_val_loss": v2_best_val, "ce_control_val_loss": ce_val,
            "adapter_converged": None if ce_val is None else ce_val >= v2_best_val}


def seed_result(cfg: DemoConfig, done: dict) -> dict:
    """The results.json entry and the details of one seed, from its finished jobs
    (``done[(kind, name)]``)."""
    from muscle_fast import metrics

    correct = {"v1": done["adapter", "v1"]["correct"], "v2": done["adapter", "v2"]["correct"]}
    correct |= {row: done["compat", row]["correct"] for row in cfg.rows}
    o = correct["v1"]
    models = {"v1": {"acc": float(o.mean())},
              "v2": {**_rates(o, correct["v2"]),
                     "n_negative_flips": int(np.sum(o & ~correct["v2"]))}}
    for row in cfg.rows:
        d = metrics.compat_deltas(o.astype(float), correct["v2"].astype(float),
                                  correct[row].astype(float))
        models[row] = {**_rates(o, correct[row]), "d_nfr_c": d.dnfr_c,
                       "d_pct_nfr_c": d.dpct_nfr_c, "dacc_c": d.dacc_c}
    test, train, val = split_items(cfg)
    ops = np.array([it[0] for it in test])
    per_op = {op: {n: float(c[ops == op].mean()) for n, c in correct.items()} for op in OPS}
    jobs = {f"{k}_{n}": {"seconds": j["seconds"], "cpu_s": j["cpu_s"]} for (k, n), j in done.items()}
    details = {
        "seed": cfg.seed,
        "config": json.loads(json.dumps(asdict(cfg), default=list)),
        "n_train": len(train), "n_val": len(val), "n_test": len(test),
        "bases_cached": {n: done["base", n]["cached"] for n in ("v1", "v2")},
        "bases": {n: done["base", n]["info"] for n in ("v1", "v2")},
        "task_adapters": {n: done["adapter", n]["info"] for n in ("v1", "v2")},
        "val_loss_after_compat": {row: done["compat", row]["val_loss"] for row in cfg.rows},
        "checks": seed_checks(models, len(test), done["adapter", "v2"]["info"]["best_val_loss"],
                              done["compat", "ce_control"]["val_loss"]
                              if "ce_control" in cfg.rows else None),
        "n_negative_flips": {n: int(np.sum(o & ~c)) for n, c in correct.items() if n != "v1"},
        "flip_grids": {n: [[int(np.sum(o & c)), int(np.sum(o & ~c))],
                           [int(np.sum(~o & c)), int(np.sum(~o & ~c))]]
                       for n, c in correct.items() if n != "v1"},
        "per_op_acc": per_op,
        "train_log": {row: done["compat", row]["train_log"] for row in cfg.rows},
        "teacher_caches": {row: done["compat", row]["cache"] for row in cfg.rows
                           if row in CACHE_ROWS},
        "jobs": jobs, "cpu_s": round(sum(j["cpu_s"] for j in jobs.values()), 1),
    }
    return {"result": {"seed": cfg.seed, "n_test": len(test), "models": models},
            "details": details}


# ---------------------------------------------------------------- several seeds


def summarize(seed_results: list[dict]) -> dict:
    """Mean, min and max over seeds of every rate and delta of every row (fractions)."""
    rows = {}
    for name in ("v1", "v2", *COMPAT_ROWS):
        entries = [r["models"][name] for r in seed_results if name in r["models"]]
        if not entries:
            continue
        rows[name] = {}
        for key in entries[0]:
            vals = [float(e[key]) for e in entries]
            finite = [v for v in vals if math.isfinite(v)]
            rows[name][key] = {"mean": float(np.mean(finite)) if finite else None,
                               "min": min(vals), "max": max(vals)}
    out = {"seeds": [r["seed"] for r in seed_results], "rows": rows}
    if "muscle" in rows:
        target = []
        for r in seed_results:
            m, v2 = r["models"]["muscle"], r["models"]["v2"]
            c = r["models"].get("ce_control")
            target.append({"seed": r["seed"], "d_pct_nfr_c_le_-15pct": m["d_pct_nfr_c"] <= -0.15,
                           "acc_c_ge_acc_v2_-1pt": m["acc"] >= v2["acc"] - 0.01 - 1e-12,
                           "beats_ce_control": None if c is None else m["nfr"] < c["nfr"]})
        mean_pct = rows["muscle"]["d_pct_nfr_c"]["mean"]
        out["target"] = {"per_seed": target,
                         "mean_d_pct_nfr_c_le_-30pct": mean_pct is not None and mean_pct <= -0.30,
                         "met": (mean_pct is not None and mean_pct <= -0.30 and all(
                             t["d_pct_nfr_c_le_-15pct"] and t["acc_c_ge_acc_v2_-1pt"]
                             and t["beats_ce_control"] is not False for t in target))}
    return out


def run_demo(out_dir="muscle_demo", seeds: Sequence[int] = DEFAULT_SEEDS, quiet: bool = False,
             console=None, quick: bool = False, jobs: int | None = None,
             cfg: DemoConfig | None = None) -> dict:
    """Run the demo for every seed; write ``results.json``, ``details.json`` and ``flips.png``
    in ``out_dir``; return the results dict (rates as fractions). The work runs in three phases
    (bases, task adapters, compatibility rows), each phase's units over all seeds in ``jobs``
    processes (default: one per CPU core). ``cfg`` (its seed replaced) overrides the default
    configuration."""
    from rich.console import Console

    console = console or Console(quiet=quiet)
    out = Path(out_dir)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    seeds = list(seeds)
    cfgs = {s: replace(cfg, seed=s) if cfg is not None
            else DemoConfig.quick(s) if quick else DemoConfig(seed=s) for s in seeds}
    jobs = max(1, jobs or os.cpu_count() or 1)
    c0 = next(iter(cfgs.values()))

    def base_text(spec: BaseSpec) -> str:
        steps = (f"{spec.steps} steps" if spec.converge_tol is None else
                 f"until converged (at most {spec.steps} steps, {spec.max_runs} run(s))")
        mix = ", ".join(f"{o} {w:g}" for o, w in spec.mix if w > 0)
        return f"hidden {spec.hidden}, {steps}, corpus mix {mix}"

    console.print(f"[bold]MUSCLE demo[/bold], seeds {seeds}, {jobs} process(es); v1: "
                  f"{base_text(c0.v1)}; v2: {base_text(c0.v2)}; task: {c0.n_pool} items "
                  f"(train {1 - c0.val_frac:.0%} / val {c0.val_frac:.0%}), {c0.n_test} held-out; "
                  f"task adapters: {c0.task_steps} steps, linear lr decay from {c0.task_lr:g}, "
                  f"best of {c0.task_inits} init(s) by val loss")
    t0 = time.perf_counter()
    done: dict = {}
    phases = (("base", ("v2", "v1"), "1. pre-trained bases (cached in the output directory)"),
              ("adapter", ("v2", "v1"), "2. task adapters (kept at their best validation loss)"),
              # the cache rows run after the live ones (in the table they sit beside MUSCLE)
              ("compat", tuple(sorted(c0.rows, key=lambda r: r in CACHE_ROWS)),
               (f"3. compatibility rows, from the v2 task adapter "
                f"({c0.compat_steps} steps each, lr {c0.compat_lr})")))
    names = {kind: n for kind, n, _ in phases}
    titles = {kind: title for kind, _, title in phases}
    order = [kind for kind, _, _ in phases]

    def units_of(kind: str, seed: int) -> list:
        return [_Job(out, cfgs[seed], kind, n, quiet or jobs > 1) for n in names[kind]]

    left = {kind: len(names[kind]) * len(seeds) for kind in order}

    def finished(u: _Job, r: dict) -> list:
        """Record a unit; return the units it unblocks (its seed's next phase, once every unit
        of this phase of that seed is done)."""
        done[u.cfg.seed, u.kind, u.name] = r
        left[u.kind] -= 1
        if left[u.kind] == 0:
            console.print(f"  {titles[u.kind]}: done ({time.perf_counter() - t0:.0f} s)")
        k = order.index(u.kind)
        if k + 1 == len(order) or any((u.cfg.seed, u.kind, n) not in done
                                      for n in names[u.kind]):
            return []
        return units_of(order[k + 1], u.cfg.seed)

    # one queue: a seed's next phase is ready as soon as its own units are done; earlier phases
    # (the longer units) go first, so the short compatibility rows fill the end. jobs=1 runs the
    # queue in this process, which is phase by phase.
    ready = [u for seed in seeds for u in units_of(order[0], seed)]
    if jobs == 1:
        while ready:
            ready.sort(key=lambda u: order.index(u.kind))  # stable: seeds, names in order
            u = ready.pop(0)
            ready += finished(u, u())
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        running = {}
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            while ready or running:
                ready.sort(key=lambda u: order.index(u.kind))
                while ready and len(running) < jobs:
                    u = ready.pop(0)
                    running[pool.submit(_call, u)] = u
                complete, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in complete:
                    ready += finished(running.pop(f), f.result())
    per_seed = {s: seed_result(cfgs[s], {k[1:]: v for k, v in done.items() if k[0] == s})
                for s in seeds}
    for s in seeds:
        _render_seed(per_seed[s]["result"], console)
    results = [per_seed[s]["result"] for s in seeds]
    details = [per_seed[s]["details"] for s in seeds]
    summary = summarize(results)
    summary["checks"] = [{"seed": d["seed"], **d["checks"]} for d in details]
    wall = round(time.perf_counter() - t0, 1)
    result = {"seeds": results, "summary": summary, "wall_s": wall}
    from muscle_fast import flips as _flips

    from .demo_plot import plot_demo

    _flips.write_json(result, out / "results.json")
    _flips.write_json({"seeds": details, "cpu_s": round(sum(d["cpu_s"] for d in details), 1)},
                      out / "details.json")
    plot_demo(results, details, out / "flips.png")
    _render_summary(summary, console)
    console.print(f"results: {out / 'results.json'}  details: {out / 'details.json'}  "
                  f"plot: {out / 'flips.png'}  wall time: {wall:.0f} s", highlight=False)
    return result


# ---------------------------------------------------------------- printing


def _pct(x, signed: bool = False) -> str:
    if x is None:
        return ""
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _render_seed(r: dict, console) -> None:
    from rich.table import Table

    m = r["models"]
    t = Table(title=f"seed {r['seed']}: update v1 -> v2 on {r['n_test']} held-out items "
                    f"({m['v2']['n_negative_flips']} negative flips); values in %")
    for c in ("row", "acc", "NFR", "PFR", "dNFR_c", "d%NFR_c", "dacc_c"):
        t.add_column(c, justify="left" if c == "row" else "right")
    t.add_row(ROW_NAMES["v1"], _pct(m["v1"]["acc"]), "", "", "", "", "")
    t.add_row(ROW_NAMES["v2"], _pct(m["v2"]["acc"]), _pct(m["v2"]["nfr"]), _pct(m["v2"]["pfr"]),
              "", "", "")
    for row in COMPAT_ROWS:
        if row in m:
            e = m[row]
            t.add_row(ROW_NAMES[row], _pct(e["acc"]), _pct(e["nfr"]), _pct(e["pfr"]),
                      _pct(e["d_nfr_c"], True), _pct(e["d_pct_nfr_c"], True),
                      _pct(e["dacc_c"], True))
    console.print(t)


def summary_lines(s: dict) -> list[str]:
    """The summary as plain text lines: mean (min..max) over seeds of every rate and delta."""
    def cell(e, signed=False):
        mean = _pct(e["mean"], signed) if e["mean"] is not None else "n/a"
        return f"{mean} ({_pct(e['min'], signed)}..{_pct(e['max'], signed)})"

    head = f"summary over seeds {','.join(map(str, s['seeds']))}: mean (min..max), in %"
    lines = [head + " (d%NFR_c means leave out infinite values)"]
    keys = (("acc", "acc", False), ("nfr", "NFR", False), ("pfr", "PFR", False),
            ("d_nfr_c", "dNFR_c", True), ("d_pct_nfr_c", "d%NFR_c", True),
            ("dacc_c", "dacc_c", True))
    width = max(len(ROW_NAMES[name]) for name in s["rows"])
    for name, e in s["rows"].items():
        parts = [f"{label} {cell(e[k], signed)}" for k, label, signed in keys if k in e]
        lines.append(f"  {ROW_NAMES[name]:<{width}} " + " | ".join(parts))
    yn = {True: "yes", False: "no", None: "n/a"}
    for c in s.get("checks", []):
        ce = c["ce_control_val_loss"]
        ce_text = "" if ce is None else (f" (CE control's val loss {ce:.3f} vs best "
                                         f"{c['v2_adapter_best_val_loss']:.3f})")
        lines.append(f"setting, seed {c['seed']}: v2 more accurate than v1 {yn[c['v2_better']]}, "
                     f"NFR >= 4% {yn[c['nfr_ge_4pct']]}, >= 100 negative flips "
                     f"{yn[c['negative_flips_ge_100']]}, >= 3000 held-out items "
                     f"{yn[c['n_test_ge_3000']]}, v2 task adapter converged (more CE does not "
                     f"lower its val loss) {yn[c['adapter_converged']]}{ce_text}")
    if "target" in s:
        tg = s["target"]
        lines.append(f"target: MUSCLE mean d%NFR_c <= -30%: "
                     f"{'yes' if tg['mean_d_pct_nfr_c_le_-30pct'] else 'no'}")
        for p in tg["per_seed"]:
            lines.append(f"  seed {p['seed']}: d%NFR_c <= -15% "
                         f"{'yes' if p['d_pct_nfr_c_le_-15pct'] else 'no'}, acc_c >= acc_v2 - 1 "
                         f"{'yes' if p['acc_c_ge_acc_v2_-1pt'] else 'no'}, NFR below the CE "
                         f"control's {'yes' if p['beats_ce_control'] else 'no'}")
        lines.append(f"target {'MET' if tg['met'] else 'NOT MET'}")
    return lines


def _render_summary(s: dict, console) -> None:
    for line in summary_lines(s):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


# ---------------------------------------------------------------- CLI


def _seed_list(text: str) -> list[int]:
    out = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of seeds or ranges (e.g. 0,1,2 or 0-4)"
        ) from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one seed")
    return out


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``muscle-fast demo``."""
    parser.add_argument("--out", default="muscle_demo", help="output directory (results.json, "
                        "details.json, flips.png, cached bases); default: ./muscle_demo")
    parser.add_argument("--seeds", type=_seed_list, default=list(DEFAULT_SEEDS),
                        help="comma-separated seeds or ranges, e.g. 0,1,2 or 0-4 (default: "
                        f"{','.join(map(str, DEFAULT_SEEDS))})")
    parser.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes that run the work of all seeds in parallel (default: one per "
                        "CPU core)")
    parser.add_argument("--quick", action="store_true", help="a tiny run, for tests")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    return parser


def demo_main(args: argparse.Namespace) -> int:
    """Entry point of ``muscle-fast demo``; returns the exit code."""
    seeds = [args.seed] if args.seed is not None else args.seeds
    run_demo(args.out, seeds, quiet=args.quiet, quick=args.quick, jobs=args.jobs)
    return 0


if __name__ == "__main__":  # python -m muscle_fast.train.demo
    raise SystemExit(demo_main(add_demo_arguments(argparse.ArgumentParser()).parse_args()))
