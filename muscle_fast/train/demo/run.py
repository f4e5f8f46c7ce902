"""Step 6 of the demo: the run. Three phases (bases, task adapters, compatibility rows), each
phase's units over all seeds in parallel processes, then the tables, the rungs, the summary,
``results.json``, ``details.json`` and ``flips.png``; and the ``muscle-fast demo`` command."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import report
from .adapters import predict, train_task_adapter
from .bases import base_key, pretrain_base
from .rows import train_compat_row
from .setting import CACHE_ROWS, BaseSpec, DemoConfig, build_tokenizer, collate, split_items, \
    task_answer, task_rows

# design G; fixed before any design was run on them (DEMO_RESULTS.md)
DEFAULT_SEEDS = (50, 51, 52)


@torch.no_grad()
def answer_tokens_right(model, rows, answer_len: int) -> float:
    """The share of the answer tokens of ``rows`` whose label the model's argmax gives, the
    answer before it given (teacher forcing): what ``mask="muscle"`` looks at on them."""
    b = collate(rows)
    logits = model(input_ids=b["input_ids"]).logits[:, -answer_len - 1:-1]
    return float((logits.argmax(-1) == b["input_ids"][:, -answer_len:]).float().mean())


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
        return self.out / "cache" / f"base_{name}_{base_key(spec, self.cfg, self._base_seed(name))}"

    def _base_seed(self, name: str) -> int:
        return self.cfg.seed * 100 + (1 if name == "v1" else 2)

    def __call__(self) -> dict:
        import warnings

        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # third-party notices that say nothing about the demo: peft reads a property that
        # transformers 5 deprecated; DeepSpeed, where installed, is imported by save_pretrained
        # and announces that it found no GPU (the demo runs on the CPU by design)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t, cpu = time.perf_counter(), time.process_time()
        try:
            out = getattr(self, f"_{self.kind}")()
        finally:
            torch.set_num_threads(threads)
        return {**out, "seconds": round(time.perf_counter() - t, 1),
                "cpu_s": round(time.process_time() - cpu, 1)}

    def _data(self):
        tok = build_tokenizer()
        test, train_items, val_items = split_items(self.cfg)
        labels = np.array([task_answer(it, self.cfg) for it in test])
        return (tok, test, labels, task_rows(tok, train_items, self.cfg),
                task_rows(tok, val_items, self.cfg))

    def _answers(self, model, tok, test, labels) -> dict:
        pred = predict(model, tok, test, self.cfg.answer_len)
        return {"correct": (pred == labels).all(1), "pred": [" ".join(map(str, p)) for p in pred]}

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

        tok, test, labels, train, val = self._data()
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
        return {"info": info, "train_right": answer_tokens_right(model, train, self.cfg.answer_len),
                **self._answers(model, tok, test, labels)}

    def _compat(self) -> dict:
        tok, test, labels, train, val = self._data()
        paths = {"v1": self.base_path("v1"), "v2": self.base_path("v2"),
                 "adapter_v1": self.run_dir / "adapter_v1",
                 "adapter_v2": self.run_dir / "adapter_v2"}
        cache_dir = (self.run_dir / f"teacher_cache_{CACHE_ROWS[self.name]}"
                     if self.name in CACHE_ROWS else None)
        model, log, val_loss, cache_info = train_compat_row(
            self.cfg, self.name, paths, tok, train, val, self.quiet, cache_dir)
        model.save_pretrained(self.run_dir / f"compat_{self.name}")
        return {"train_log": log, "val_loss": val_loss, "cache": cache_info,
                **self._answers(model.student, tok, test, labels)}


def _call(job: _Job) -> dict:
    return job()


def _base_text(spec: BaseSpec) -> str:
    steps = (f"{spec.steps} steps" if spec.converge_tol is None else
             f"until converged (at most {spec.steps} steps, {spec.max_runs} run(s))")
    mix = ", ".join(f"{o} {w:g}" for o, w in spec.mix if w > 0)
    return f"hidden {spec.hidden}, {spec.layers} layers, {steps}, corpus mix {mix}"


def run_demo(out_dir="muscle_demo", seeds: Sequence[int] = DEFAULT_SEEDS, quiet: bool = False,
             console=None, quick: bool = False, jobs: int | None = None,
             cfg: DemoConfig | None = None) -> dict:
    """Run the demo for every seed; write ``results.json``, ``details.json`` and ``flips.png``
    in ``out_dir``; return the results dict (rates as fractions). The work runs in three phases
    (bases, task adapters, compatibility rows), each phase's units over all seeds in ``jobs``
    processes (default: one per CPU core). ``cfg`` (its seed replaced) overrides the default
    configuration."""
    from rich.console import Console

    # a table wider than 80 columns stays one line per row in a log file or a pipe
    console = console or Console(quiet=quiet, width=None if sys.stdout.isatty() else 132)
    out = Path(out_dir)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    seeds = list(seeds)
    cfgs = {s: replace(cfg, seed=s) if cfg is not None
            else DemoConfig.quick(s) if quick else DemoConfig(seed=s) for s in seeds}
    jobs = max(1, jobs or os.cpu_count() or 1)
    c0 = next(iter(cfgs.values()))
    console.print(
        f"[bold]MUSCLE demo[/bold], seeds {seeds}, {jobs} process(es); v1: {_base_text(c0.v1)}; "
        f"v2: {_base_text(c0.v2)}; task: 'Q op a b c A' + {c0.answer_len} answer token(s), "
        f"label noise {c0.label_noise:g}, loss over {'context and answer' if c0.loss_on == 'all' else 'the answer'}, "
        f"{c0.n_pool} items (train {1 - c0.val_frac:.0%} / val {c0.val_frac:.0%}), {c0.n_test} "
        f"held-out; task adapters: LoRA r={c0.lora_r}, {c0.task_steps} steps, linear lr decay "
        f"from {c0.task_lr:g}, best of {c0.task_inits} init(s) by val loss", highlight=False)
    t0 = time.perf_counter()
    done: dict = {}
    phases = (("base", ("v2", "v1"), "1. pre-trained bases (cached in the output directory)"),
              ("adapter", ("v2", "v1"), "2. task adapters (kept at their best validation loss)"),
              # the long CE row first, the cache rows last (in the table they sit beside MUSCLE)
              ("compat", tuple(sorted(c0.rows, key=lambda r: (r != "ce_control_4x",
                                                             r in CACHE_ROWS))),
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
    per_seed = {}
    for s in seeds:
        test, train, val = split_items(cfgs[s])
        per_seed[s] = report.seed_result(cfgs[s], {k[1:]: v for k, v in done.items() if k[0] == s},
                                         test, len(train), len(val))
    for s in seeds:
        r, d = per_seed[s]["result"], per_seed[s]["details"]
        console.print(report.seed_table(r, d))
        for line in report.rung_lines(s, d["rungs"]):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    results = [per_seed[s]["result"] for s in seeds]
    details = [per_seed[s]["details"] for s in seeds]
    summary = report.summarize(results, [d["rungs"] for d in details])
    wall = round(time.perf_counter() - t0, 1)
    result = {"seeds": results, "summary": summary, "wall_s": wall}
    from muscle_fast import flips as _flips

    from .plot import plot_demo

    _flips.write_json(result, out / "results.json")
    _flips.write_json({"seeds": details, "cpu_s": round(sum(d["cpu_s"] for d in details), 1)},
                      out / "details.json")
    plot_demo(results, details, out / "flips.png")
    for line in report.summary_lines(summary):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(f"results: {out / 'results.json'}  details: {out / 'details.json'}  "
                  f"plot: {out / 'flips.png'}  elapsed: {wall:.0f} s", highlight=False)
    return result


# ---------------------------------------------------------------- CLI


def seed_list(text: str) -> list[int]:
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
    parser.add_argument("--seeds", type=seed_list, default=list(DEFAULT_SEEDS),
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
