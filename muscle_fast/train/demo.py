"""``muscle-fast demo``: a controlled model update on real transformers + peft parts, end to end.

1. Two tiny Llama bases with one shared tokenizer, pre-trained here on a synthetic corpus of
   digit operations (``op a b c = r``); v2 is the genuine upgrade: the same pre-training run
   continued longer (450 -> 600 steps), which is where ``add2`` = (a+b) mod 10 is learned
   (bases cached in the output directory after the first run).
2. A downstream task with an exact answer, in a format the bases never saw
   (``Q op a b c A r``); a LoRA task adapter is trained on each base on the same training items.
3. Old (v1 + adapter) and new (v2 + adapter) task models are evaluated on held-out items:
   accuracy, negative flips.
4. The compatibility adapter (a copy of the v2 task adapter on v2) is trained with CompatTrainer
   and ``fused_compat_loss`` for each mask (``muscle``, ``old_correct``, plain KD ``all_old``),
   and evaluated: the paper's Table-4 columns, a flips plot and a results JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

OPS = ("first", "last", "max", "min", "add", "add2")
DIGITS = tuple(str(d) for d in range(10))
SPECIAL = ("<pad>", "<bos>", "<eos>", "=", "Q", "A")


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
    if op == "add2":  # ignores c: a 100-entry table, learned late in pre-training
        return (a + b) % 10
    if op == "sub":
        return (a - b + c) % 10
    raise ValueError(op)


@dataclass
class DemoConfig:
    """Everything that decides the demo's numbers (seeds included)."""

    seed: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 192
    pre_batch: int = 128
    pre_lr: float = 1e-3
    # the update: v2 is the same pre-training run as v1, continued from 450 to 600 steps (a later
    # checkpoint); on this corpus those extra steps are where `add2` and then `add` are learned.
    # v2_from_v1=False trains v2 from its own init (measured worse: DEMO_RESULTS.md)
    v1_steps: int = 450
    v2_steps: int = 600
    v2_from_v1: bool = True
    n_task_train: int = 1500
    n_test: int = 1500
    lora_r: int = 8
    task_steps: int = 200
    task_batch: int = 64
    task_lr: float = 3e-3
    compat_steps: int = 200
    compat_batch: int = 64
    compat_lr: float = 2e-3
    temperature: float = 2.0
    masks: Sequence[str] = ("muscle", "old_correct", "all_old")

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        return cls(seed=seed, hidden=32, intermediate=64, v1_steps=60, v2_steps=120,
                   n_task_train=256, n_test=256, task_steps=30, compat_steps=12, task_batch=32,
                   compat_batch=32)


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
    """n distinct (op, a, b, c) items not in exclude."""
    out, seen = [], set(exclude)
    while len(out) < n:
        it = (OPS[rng.integers(len(OPS))], *map(int, rng.integers(0, 10, 3)))
        if it not in seen:
            seen.add(it)
            out.append(it)
    return out


def _encode(tok, texts: list[str]) -> torch.Tensor:
    return torch.tensor(tok(texts, add_special_tokens=True)["input_ids"], dtype=torch.long)


def _pretrain_text(it) -> str:
    op, a, b, c = it
    return f"{op} {a} {b} {c} = {_op(op, a, b, c)} <eos>"


def _task_prompt(it) -> str:
    op, a, b, c = it
    return f"Q {op} {a} {b} {c} A"


def task_rows(tok, items) -> list[dict]:
    """Task examples for training: the loss sees only the answer token."""
    ids = _encode(tok, [f"{_task_prompt(it)} {_op(*it)} <eos>" for it in items])
    labels = torch.full_like(ids, -100)
    labels[:, -2] = ids[:, -2]  # the answer digit
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": l}
            for i, l in zip(ids, labels)]


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------- models


def _tiny_llama(cfg: DemoConfig, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=16, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)


def pretrain_base(cfg: DemoConfig, tok, steps: int, seed: int, quiet: bool,
                  snapshots: dict | None = None):
    """Causal-LM pre-training on the synthetic corpus (all ops, uniform mix); ``snapshots``
    maps a step count to a directory where the model (and tokenizer) is saved after that step."""
    model = _tiny_llama(cfg, len(tok), seed)
    model.train()
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pre_lr, weight_decay=0.01)
    bar = _progress(steps, f"pre-train base ({steps} steps)", quiet)
    for step in range(1, steps + 1):
        batch = [(OPS[rng.integers(len(OPS))], *map(int, rng.integers(0, 10, 3)))
                 for _ in range(cfg.pre_batch)]
        ids = _encode(tok, [_pretrain_text(it) for it in batch])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)
        bar.update(), bar.set_postfix(loss=f"{loss.item():.3f}")
        if snapshots and step in snapshots:
            model.save_pretrained(snapshots[step])
            tok.save_pretrained(snapshots[step])
    bar.close()
    return model.eval()


def train_task_adapter(cfg: DemoConfig, base, rows, seed: int, quiet: bool, desc: str):
    """A LoRA task adapter trained with cross-entropy on the answer token."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(
        r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.task_lr)
    g = torch.Generator().manual_seed(seed)
    bar = _progress(cfg.task_steps, desc, quiet)
    for _ in range(cfg.task_steps):
        idx = torch.randint(len(rows), (cfg.task_batch,), generator=g).tolist()
        batch = _collate([rows[i] for i in idx])
        loss = model(**batch).loss
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)
        bar.update(), bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def predict(model, tok, items, batch: int = 512) -> np.ndarray:
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


# ---------------------------------------------------------------- the run


def _cache_key(cfg: DemoConfig, steps: int, seed: int) -> str:
    keys = ("hidden", "layers", "heads", "intermediate", "pre_batch", "pre_lr")
    blob = json.dumps({k: getattr(cfg, k) for k in keys} | {"steps": steps, "seed": seed,
                                                          "vocab": SPECIAL + DIGITS + OPS})
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _continued_bases(cfg, tok, seed, cache: Path, quiet, log):
    """v1 and v2 as two checkpoints (v1_steps, v2_steps) of one pre-training run."""
    from transformers import LlamaForCausalLM

    paths = [cache / f"base_{n}_{_cache_key(cfg, k, seed)}"
             for n, k in (("v1", cfg.v1_steps), ("v2", cfg.v2_steps))]
    if all((p / "config.json").exists() for p in paths):
        log(f"  v1, v2: cached pre-trained bases {paths[0]}, {paths[1]}")
    else:
        t = time.perf_counter()
        pretrain_base(cfg, tok, cfg.v2_steps, seed, quiet,
                      snapshots={cfg.v1_steps: paths[0], cfg.v2_steps: paths[1]})
        log(f"  v1, v2: one pre-training run, checkpoints at {cfg.v1_steps} and {cfg.v2_steps} "
            f"steps, in {time.perf_counter() - t:.1f} s -> {paths[0]}, {paths[1]}")
    return [(LlamaForCausalLM.from_pretrained(p).eval(), p) for p in paths]


def _base(cfg, tok, name, steps, seed, cache: Path, quiet, log):
    from transformers import LlamaForCausalLM

    path = cache / f"base_{name}_{_cache_key(cfg, steps, seed)}"
    if (path / "config.json").exists():
        log(f"  {name}: cached pre-trained base {path}")
        return LlamaForCausalLM.from_pretrained(path).eval(), path
    t = time.perf_counter()
    model = pretrain_base(cfg, tok, steps, seed, quiet)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    log(f"  {name}: pre-trained {steps} steps in {time.perf_counter() - t:.1f} s -> {path}")
    return model, path


class _Bar:
    """A tqdm bar for a Trainer run showing the loss and the fraction of tokens sent to old."""

    def __new__(cls, desc: str, quiet: bool):
        from transformers import TrainerCallback

        class Bar(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                self.bar = _progress(state.max_steps, desc, quiet)

            def on_step_end(self, args, state, control, **kw):
                self.bar.update()

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.bar.set_postfix(loss=f"{logs['loss']:.4f}",
                                         to_old=f"{logs.get('compat/frac_to_old', 0):.2f}")

            def on_train_end(self, args, state, control, **kw):
                self.bar.close()

        return Bar()


def _eval_log(name: str, items, preds: np.ndarray, labels: np.ndarray):
    from muscle_fast.flips import EvalLog

    keys = list(range(len(items)))
    return EvalLog(path=f"<demo:{name}>", fmt="jsonl", metric="acc", order=keys,
                   scores={k: float(preds[k] == labels[k]) for k in keys},
                   preds={k: int(preds[k]) for k in keys}, pred_note=None,
                   labels={k: int(labels[k]) for k in keys})


def run_demo(out_dir, cfg: DemoConfig | None = None, quiet: bool = False,
             console=None) -> dict:
    """Run the whole demo; write ``results.json`` and ``flips.png`` in ``out_dir``; return the
    results dict (rates as fractions)."""
    # tiny matmuls gain nothing from intra-op threads, and OpenMP threads stall badly when the
    # cores are shared (measured here: a pre-training step took 0.05 s on 1 thread, 3 s on 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(out_dir, cfg, quiet, console)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out_dir, cfg, quiet, console) -> dict:
    from rich.console import Console
    from transformers import PrinterCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from muscle_fast import flips, metrics
    from muscle_fast.train import CompatArguments, CompatTrainer, build_compat_model

    cfg = cfg or DemoConfig()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    console = console or Console(quiet=quiet)
    log = console.print
    out = Path(out_dir)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = build_tokenizer()

    log("[bold]1. pre-training the bases[/bold] (v2 = the upgrade: "
        f"{cfg.v2_steps} vs {cfg.v1_steps} steps"
        f"{', one run continued' if cfg.v2_from_v1 else ', own init'})")
    if cfg.v2_from_v1:
        (v1, v1_path), (v2, v2_path) = _continued_bases(cfg, tok, cfg.seed * 100 + 1,
                                                        out / "cache", quiet, log)
    else:
        v1, v1_path = _base(cfg, tok, "v1", cfg.v1_steps, cfg.seed * 100 + 1, out / "cache",
                            quiet, log)
        v2, v2_path = _base(cfg, tok, "v2", cfg.v2_steps, cfg.seed * 100 + 2, out / "cache",
                            quiet, log)

    rng = np.random.default_rng(cfg.seed)
    test_items = _items(rng, cfg.n_test)
    train_items = _items(rng, cfg.n_task_train, exclude=frozenset(test_items))
    labels = np.array([_op(*it) for it in test_items])
    rows = task_rows(tok, train_items)

    log(f"[bold]2. task adapters[/bold] (LoRA r={cfg.lora_r}, {len(train_items)} training items, "
        f"{len(test_items)} held-out test items)")
    run_dir = out / f"run_seed{cfg.seed}"
    m_old = train_task_adapter(cfg, v1, rows, cfg.seed * 100 + 11, quiet, "task adapter on v1")
    m_old.save_pretrained(run_dir / "adapter_v1")
    m_new = train_task_adapter(cfg, v2, rows, cfg.seed * 100 + 12, quiet, "task adapter on v2")
    m_new.save_pretrained(run_dir / "adapter_v2")
    preds = {"old": predict(m_old, tok, test_items), "new": predict(m_new, tok, test_items)}
    log(f"  task adapters trained and evaluated ({time.perf_counter() - t0:.0f} s so far)")
    del m_old, m_new, v1, v2

    log("[bold]3. compatibility adapters[/bold] (CompatTrainer + fused_compat_loss, "
        f"T={cfg.temperature}, {cfg.compat_steps} steps per mask)")
    train_log = {}
    for mask in cfg.masks:
        model = build_compat_model(str(v2_path), str(run_dir / "adapter_v2"), str(v1_path),
                                   str(run_dir / "adapter_v1"), old_tokenizer=tok,
                                   new_tokenizer=tok)
        args = TrainingArguments(
            output_dir=str(run_dir / f"trainer_{mask}"), per_device_train_batch_size=cfg.compat_batch,
            max_steps=cfg.compat_steps, learning_rate=cfg.compat_lr, lr_scheduler_type="constant",
            logging_steps=max(1, cfg.compat_steps // 4), save_strategy="no", report_to=[],
            seed=cfg.seed, data_seed=cfg.seed, use_cpu=True, disable_tqdm=True,
            dataloader_num_workers=0)
        trainer = CompatTrainer(model, args, train_dataset=rows, data_collator=_collate,
                                compat_args=CompatArguments(mask=mask, temperature=cfg.temperature))
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_Bar(f"compat adapter, mask={mask}", quiet))
        trainer.train()
        model.save_pretrained(run_dir / f"compat_{mask}")
        preds[mask] = predict(model.student, tok, test_items)
        train_log[mask] = [h for h in trainer.state.log_history if "loss" in h]
        log(f"  mask={mask}: trained and evaluated ({time.perf_counter() - t0:.0f} s so far)")
        del trainer, model

    logs = {name: _eval_log(name, test_items, p, labels) for name, p in preds.items()}
    keys = logs["old"].order
    upd = metrics.discriminative_flips([logs["old"].scores[k] for k in keys],
                                       [logs["new"].scores[k] for k in keys])
    rows_out = {}
    for mask in cfg.masks:
        s = lambda n: np.array([logs[n].scores[k] for k in keys])
        d = metrics.compat_deltas(s("old"), s("new"), s(mask))
        rows_out[mask] = {"acc_c": float(s(mask).mean()), **d.as_dict()}
    report = flips.flip_report({"old": logs["old"], "new": logs["new"],
                                "compat": logs[cfg.masks[0]]}, keys)
    png = out / "flips.png"
    flips.plot_flips(report, {"old": logs["old"], "new": logs["new"],
                              "compat": logs[cfg.masks[0]]}, keys, png)
    per_op = {op: {n: float(np.mean([logs[n].scores[k] for k in keys if test_items[k][0] == op]))
                   for n in preds} for op in OPS}
    result = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "acc_v1": upd.acc_old, "acc_v2": upd.acc_new, "nfr": upd.nfr, "pfr": upd.pfr,
        "compat": rows_out, "per_op_acc": per_op, "train_log": train_log,
        "flip_report_muscle": report, "seconds": round(time.perf_counter() - t0, 1),
        "outputs": {"flips_png": str(png), "run_dir": str(run_dir)},
    }
    flips.write_json(result, out / "results.json")
    _render(result, console)
    log(f"results: {out / 'results.json'}   flips plot: {png}   "
        f"time: {result['seconds']:.0f} s")
    return result


def _render(r: dict, console) -> None:
    from rich.table import Table

    def pct(x, signed=False):
        if x is None:
            return ""
        if math.isinf(x):
            return "+inf" if x > 0 else "-inf"
        return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"

    t = Table(title=f"Model update v1 -> v2 on the held-out task items "
                    f"(n={r['flip_report_muscle']['n']}, seed {r['config']['seed']}); values in %")
    for c in ("model", "acc", "NFR", "dacc_c", "dNFR_c", "d%NFR_c"):
        t.add_column(c, justify="left" if c == "model" else "right")
    t.add_row("old  v1 + task adapter", pct(r["acc_v1"]), "", "", "", "")
    t.add_row("new  v2 + task adapter", pct(r["acc_v2"]), pct(r["nfr"]), "", "", "")
    names = {"muscle": "MUSCLE (mask=muscle)", "old_correct": "mask=old_correct",
             "all_old": "plain KD (mask=all_old)"}
    for mask, row in r["compat"].items():
        t.add_row(names.get(mask, f"mask={mask}"), pct(row["acc_c"]), pct(row["nfr_c"]),
                  pct(row["dacc_c"], True), pct(row["dnfr_c"], True), pct(row["dpct_nfr_c"], True))
    console.print(t)


# ---------------------------------------------------------------- CLI


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``muscle-fast demo``."""
    parser.add_argument("--out", default="muscle_demo", help="output directory (results.json, "
                        "flips.png, cached bases); default: ./muscle_demo")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--quick", action="store_true", help="a tiny run (under a minute), for tests")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or table")
    return parser


def demo_main(args: argparse.Namespace) -> int:
    """Entry point of ``muscle-fast demo``; returns the exit code."""
    cfg = DemoConfig.quick(args.seed) if args.quick else DemoConfig(seed=args.seed)
    run_demo(args.out, cfg, quiet=args.quiet)
    return 0


if __name__ == "__main__":  # python -m muscle_fast.train.demo
    raise SystemExit(demo_main(add_demo_arguments(argparse.ArgumentParser()).parse_args()))
