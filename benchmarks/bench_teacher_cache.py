"""Training cost with a teacher cache: one MUSCLE step on SmolLM2-135M (CPU, float32, 2 x 256
tokens of this repository's README, LoRA r=8 on every linear layer) with live teachers, from a
``hidden`` cache and from a ``topk`` cache, and a plain cross-entropy fine-tuning step of the same
student on the same batch (the floor); plus each cache's build time and bytes per token.

Old task model = SmolLM2 with an untied, slightly perturbed output head and its final norm scaled
by 1.15, + an old LoRA adapter; new task model = SmolLM2 + a new LoRA adapter (the compatibility
adapter starts as a copy of it). The old head differs from the new one, so the ``hidden`` run
loads the old head (the realistic case), never the old body.

- time: one process holds all four setups on one student; after a correctness check (the
  ``hidden`` step's loss equals the live step's) and a warm-up step each, ``--reps`` rounds run
  the four steps interleaved (forward + backward, no optimizer step), one thread; the medians of
  wall time and of the process's CPU time (on a shared machine the CPU time is the work).
- memory: one fresh subprocess per setup loads only what it needs (live: new base + both adapters
  + old model; cache: new base + compatibility adapter (+ old head); CE: new base + adapter), runs
  a warm-up step, then measures the peak RSS of one step (VmHWM reset through
  /proc/self/clear_refs after malloc_trim). "Above the student" subtracts the CE process's RSS
  before its measured step (the student alone, its weights touched by the warm-up step).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_teacher_cache.py [--reps 4] [--k 128]
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.bench_topk_approx import real_text, smollm2
from benchmarks.harness import env_info

VARIANTS = ("live", "hidden", "topk", "ce")
ROWS, SEQ = 2, 256


def _kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def _loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def _trim():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def setup(tmp: str, k: int) -> dict:
    """Save the bases, adapters, batch; build both caches (timed). Returns the build facts."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from muscle_fast.train import build_teacher_cache

    base, tok = smollm2()
    base.hf_quantizer = None  # dequantised float32 weights: saved as plain safetensors
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    old = copy.deepcopy(base)
    with torch.no_grad():
        old.config.tie_word_embeddings = False
        head = torch.nn.Linear(old.config.hidden_size, old.config.vocab_size, bias=False)
        torch.manual_seed(3)
        head.weight.copy_(base.lm_head.weight + 0.02 * base.lm_head.weight.std()
                          * torch.randn_like(base.lm_head.weight))
        old.lm_head = head
        old.model.norm.weight.mul_(1.15)
    for name, model, seed in (("old", old, 1), ("new", base, 2)):
        model.save_pretrained(os.path.join(tmp, f"{name}_base"))
        torch.manual_seed(seed)
        m = get_peft_model(copy.deepcopy(model), LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
            init_lora_weights=False))
        with torch.no_grad():  # a small task adapter: the base stays a language model
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        m.save_pretrained(os.path.join(tmp, f"{name}_adapter"))
    ids = tok(real_text(), return_tensors="pt")["input_ids"][0][: ROWS * SEQ].reshape(ROWS, SEQ)
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    torch.save(batch, os.path.join(tmp, "batch.pt"))
    rows = [{k_: v[i] for k_, v in batch.items()} for i in range(ROWS)]
    teachers = {}
    for name in ("old", "new"):
        m = old if name == "old" else base
        teachers[name] = PeftModel.from_pretrained(m, os.path.join(tmp, f"{name}_adapter")).eval()
    facts = {}
    for kind in ("hidden", "topk"):
        t0 = time.perf_counter()
        c0 = time.process_time()
        cache = build_teacher_cache(os.path.join(tmp, kind), rows, old_model=teachers["old"],
                                    new_model=teachers["new"], kind=kind,
                                    k=k if kind == "topk" else None, progress=False)
        size = sum(s["bytes"] for s in cache.manifest["shards"])
        facts[kind] = {"build_wall_s": time.perf_counter() - t0,
                       "build_cpu_s": time.process_time() - c0,
                       "bytes": size, "bytes_per_token": size / cache.manifest["n_tokens"],
                       "tokens": cache.manifest["n_tokens"]}
    return facts


def load(variant: str, tmp: str, with_live=None):
    """The model a variant trains (live: CompatModel; caches: CachedCompatModel; ce: peft)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from muscle_fast.train import build_cached_compat_model, build_compat_model
    from muscle_fast.train.cache import cached_model

    p = lambda n: os.path.join(tmp, n)
    kw = {"dtype": torch.float32}
    if with_live is not None:  # one student for every variant (the timing process)
        return with_live.student if variant == "ce" else (
            with_live if variant == "live" else cached_model(with_live.student, p(variant)))
    if variant == "live":
        return build_compat_model(p("new_base"), p("new_adapter"), p("old_base"), p("old_adapter"),
                                  **kw)
    if variant == "ce":
        base = AutoModelForCausalLM.from_pretrained(p("new_base"), **kw)
        return PeftModel.from_pretrained(base, p("new_adapter"), is_trainable=True)
    return build_cached_compat_model(p("new_base"), p("new_adapter"), p(variant), **kw)


def step(variant: str, model, batch, tmp: str):
    from muscle_fast.train import CompatArguments, compat_training_step

    model.zero_grad(set_to_none=True)
    if variant == "ce":
        model.train()
        loss = model(**batch).loss
        loss.backward()
        return float(loss)
    args = CompatArguments(teacher_cache=None if variant == "live" else os.path.join(tmp, variant))
    return compat_training_step(model, batch, None, args)["loss"]


def head_gemms(model, batch):
    """The two teacher-head GEMMs a ``hidden`` step adds to the student's (old and new head on
    the cached states), in the loss's chunks, forward only (teachers get no gradient)."""
    from muscle_fast.train.model import _output_head, train_chunk_size

    old_h, new_h = model.cache.hidden(batch["input_ids"], batch["attention_mask"])
    old_w, new_w = model._old_head().weight, _output_head(model.student).weight
    x = [old_h.reshape(-1, old_h.shape[-1]), new_h.reshape(-1, new_h.shape[-1])]
    chunk = train_chunk_size(new_w.shape[0], torch.device("cpu"))

    def run():
        with torch.no_grad():
            for h, w in zip(x, (old_w, new_w)):
                for s in range(0, h.shape[0], chunk):
                    torch.nn.functional.linear(h[s:s + chunk], w)
    return run


def child(variant: str, tmp: str) -> None:
    torch.set_num_threads(1)
    _trim()
    rss0 = _kib("VmRSS:")
    model = load(variant, tmp)
    batch = torch.load(os.path.join(tmp, "batch.pt"))
    _trim()
    rss_loaded = _kib("VmRSS:")
    step(variant, model, batch, tmp)  # warm-up: one-time allocations, the fused path's probe
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _kib("VmRSS:")
    loss = step(variant, model, batch, tmp)
    peak = _kib("VmHWM:")
    print(json.dumps({"variant": variant, "rss_start_kib": rss0, "rss_loaded_kib": rss_loaded,
                      "rss_before_step_kib": before, "peak_step_kib": peak, "loss": loss}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--k", type=int, default=128, help="k of the topk cache")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "teacher_cache_cpu.jsonl"))
    ap.add_argument("--child", choices=VARIANTS)
    ap.add_argument("--dir")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.dir)
        return 0
    torch.set_num_threads(1)
    uptime = [_loadavg()]
    tmp = tempfile.mkdtemp(prefix="bench_teacher_cache_")
    t0 = time.time()
    facts = setup(tmp, args.k)
    print("build:", json.dumps(facts), flush=True)
    gc.collect()

    # --- memory: a fresh process per variant
    mem = {}
    for v in VARIANTS:
        r = subprocess.run([sys.executable, __file__, "--child", v, "--dir", tmp],
                           capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"memory child {v} failed")
        mem[v] = json.loads(r.stdout.strip().splitlines()[-1])
        print("memory:", mem[v], flush=True)
    uptime.append(_loadavg())

    # --- time: one process, one student, interleaved
    live = load("live", tmp)
    models = {v: load(v, tmp, with_live=live) for v in VARIANTS}
    batch = torch.load(os.path.join(tmp, "batch.pt"))
    losses = {v: step(v, models[v], batch, tmp) for v in VARIANTS}  # warm-up + correctness
    assert abs(losses["hidden"] - losses["live"]) <= 1e-5 * abs(losses["live"]), losses
    print("losses:", losses, flush=True)
    heads = head_gemms(models["hidden"], batch)
    heads()
    wall = {v: [] for v in VARIANTS + ("head_gemms",)}
    cpu = {v: [] for v in VARIANTS + ("head_gemms",)}
    for _ in range(args.reps):
        for v in VARIANTS + ("head_gemms",):
            gc.collect()
            t, c = time.perf_counter(), time.process_time()
            heads() if v == "head_gemms" else step(v, models[v], batch, tmp)
            wall[v].append(time.perf_counter() - t)
            cpu[v].append(time.process_time() - c)
        print({v: round(cpu[v][-1], 2) for v in cpu}, flush=True)
    uptime.append(_loadavg())

    env = env_info(torch.device("cpu"))
    # the student alone: the CE process after its warm-up step (weights are mapped lazily, so the
    # RSS right after loading misses pages no forward has touched yet)
    student_kib = mem["ce"]["rss_before_step_kib"]
    rows = []
    for v in VARIANTS:
        m = mem[v]
        row = dict(
            bench="teacher_cache_step", variant=v, model="SmolLM2-135M-Instruct (GGUF, float32)",
            lora="r=8 on every linear layer", dtype="float32", rows=ROWS, seq=SEQ,
            k=args.k if v == "topk" else None, reps=args.reps,
            median_wall_s=statistics.median(wall[v]), median_cpu_s=statistics.median(cpu[v]),
            wall_s=wall[v], cpu_s=cpu[v], loss=losses[v],
            rss_loaded_mib=m["rss_loaded_kib"] / 1024,
            rss_before_step_mib=m["rss_before_step_kib"] / 1024,
            peak_step_mib=m["peak_step_kib"] / 1024,
            peak_above_student_mib=(m["peak_step_kib"] - student_kib) / 1024,
            cpu_vs_live=statistics.median(cpu[v]) / statistics.median(cpu["live"]),
            cpu_vs_ce=statistics.median(cpu[v]) / statistics.median(cpu["ce"]),
            loadavg=uptime, **env)
        if v in facts:
            row.update({f"cache_{k_}": val for k_, val in facts[v].items()})
        rows.append(row)
        print(f"{v:7s} cpu {row['median_cpu_s']:.2f} s (x{row['cpu_vs_live']:.2f} live, "
              f"x{row['cpu_vs_ce']:.2f} CE), wall {row['median_wall_s']:.2f} s, peak "
              f"{row['peak_step_mib']:.0f} MiB ({row['peak_above_student_mib']:.0f} above the "
              "student)" + (f", cache {facts[v]['bytes_per_token']:.0f} B/token built in "
                            f"{facts[v]['build_wall_s']:.1f} s" if v in facts else ""), flush=True)
    rows.append(dict(bench="teacher_cache_step", variant="head_gemms",
                     note="the two teacher-head GEMMs of a hidden step alone (forward, chunked)",
                     median_wall_s=statistics.median(wall["head_gemms"]),
                     median_cpu_s=statistics.median(cpu["head_gemms"]), cpu_s=cpu["head_gemms"],
                     loadavg=uptime, **env))
    print(f"head GEMMs: cpu {rows[-1]['median_cpu_s']:.2f} s")
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {args.out}; {time.time() - t0:.0f} s; loadavg {uptime}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
