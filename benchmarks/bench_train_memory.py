"""One MUSCLE training step (``compat_training_step``), fused vs materialised: peak memory above the
models and step time, on CPU with a tiny Llama (the loss dominates: hidden 64, one layer).

Each (path, V, tokens) runs in two subprocesses, each of which builds the MUSCLE setup (new base
with the compatibility and teacher adapters, old model) and runs one warm-up step on 2 rows (lazy
imports, the fused path's one-time head probe):

- memory: the peak-RSS growth of one step on the whole batch (Linux: VmHWM after resetting it
  through /proc/self/clear_refs; the RSS before the step holds the models, the batch and the
  adapter gradients), with glibc's mmap threshold fixed at 1 MiB, so that every large tensor is
  mapped and unmapped on its own and the peak follows the live tensors rather than the heap's
  reuse and fragmentation;
- time: the median of timed steps under the default allocator (the fixed threshold would add a
  page fault per chunk), wall time and the process's CPU time (``time.process_time``; on a
  shared machine the CPU time is the work, the wall time adds the waits for a core, so the ratio
  is taken on CPU time, with one thread).

Correctness (loss, stats, adapter gradients) is checked in the parent, on a small batch, before
any timing.

    PYTHONPATH=. python benchmarks/bench_train_memory.py [--v 32000 128256 --tokens 1024 4096]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PATHS = ("materialised", "fused")
HIDDEN, SEQ_PER_ROWS = 64, {1024: (4, 256), 4096: (8, 512)}


def _llama(vocab, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def build(vocab, tmp):
    from peft import LoraConfig, get_peft_model

    from muscle_fast.train import build_compat_model

    adapters = {}
    for name, seed in (("old", 1), ("new", 2)):
        torch.manual_seed(seed + 10)
        m = get_peft_model(_llama(vocab, seed), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
            init_lora_weights=False))
        adapters[name] = os.path.join(tmp, f"{name}_adapter_{vocab}")
        m.save_pretrained(adapters[name])
    model = build_compat_model(_llama(vocab, 2), adapters["new"], _llama(vocab, 1), adapters["old"])
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.compat_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def batch(vocab, rows, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step(model, b, path):
    from muscle_fast.train import CompatArguments, compat_training_step

    model.zero_grad(set_to_none=True)
    return compat_training_step(model, b, None, CompatArguments(fused_linear=path == "fused"))


def _status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def child(args):
    torch.set_num_threads(args.threads)
    rows, seq = SEQ_PER_ROWS[args.tokens]
    with tempfile.TemporaryDirectory() as tmp:
        model = build(args.v, tmp)
    b = batch(args.v, rows, seq)
    step(model, batch(args.v, 2, 16, seed=1), args.path)  # warm-up
    if args.measure == "memory":
        with open("/proc/self/clear_refs", "w") as f:  # Linux: peak RSS (VmHWM) := current RSS
            f.write("5")
        before = _status_kib("VmRSS:")
        step(model, b, args.path)
        growth = (_status_kib("VmHWM:") - before) * 1024
        print(json.dumps({"peak_growth_bytes": growth, "rss_before_bytes": before * 1024}))
        return
    step(model, b, args.path)
    times, cpu = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(model, b, args.path)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({"median_s": statistics.median(times), "times_s": times,
                      "median_cpu_s": statistics.median(cpu), "cpu_s": cpu}))


def check(vocab):
    """Fused and materialised agree on a small batch: loss, stats, adapter gradients."""
    with tempfile.TemporaryDirectory() as tmp:
        model = build(vocab, tmp)
    b = batch(vocab, 2, 24, seed=2)
    out = {}
    for path in PATHS:
        stats = step(model, b, path)
        out[path] = stats, {n: p.grad.clone() for n, p in model.named_parameters()
                            if p.requires_grad}
    (sf, gf), (sm, gm) = out["fused"], out["materialised"]
    for k, v in sm.items():
        assert abs(sf[k] - v) <= 1e-5 * max(1.0, abs(v)), f"{k}: fused {sf[k]} != {v}"
    for n, g in gm.items():
        err = (gf[n] - g).abs().max().item()
        assert err <= 1e-5 * max(1.0, g.abs().max().item()), f"grad {n}: {err}"


def _cpu_model():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                    platform.processor() or platform.machine())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--v", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096],
                   choices=sorted(SEQ_PER_ROWS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--measure", choices=("memory", "time"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "train_memory_cpu.jsonl"))
    args = p.parse_args()
    if args.path:
        args.v, args.tokens = args.v[0], args.tokens[0]
        return child(args)

    for v in args.v:
        check(v)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    from muscle_fast.train.model import train_chunk_size

    for v in args.v:
        for tokens in args.tokens:
            rows = {}
            for path in PATHS:
                row = {"path": path}
                for measure in ("memory", "time"):
                    cmd = [sys.executable, __file__, "--path", path, "--measure", measure,
                           "--v", str(v), "--tokens", str(tokens), "--reps", str(args.reps),
                           "--threads", str(args.threads)]
                    env = dict(os.environ)
                    if measure == "memory":
                        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
                    res = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                         check=False)
                    if res.returncode != 0:
                        raise RuntimeError(res.stderr[-3000:])
                    row.update(json.loads(res.stdout.strip().splitlines()[-1]))
                with open("/proc/loadavg") as f:
                    load = f.read().split()[0]
                row.update(device=f"cpu ({_cpu_model()}, {args.threads} threads, "
                                  f"{os.cpu_count()} cores)", load_1min=float(load),
                           memory_malloc_mmap_threshold=1 << 20, dtype="float32",
                           tokens=tokens, rows_x_seq=list(SEQ_PER_ROWS[tokens]),
                           H=HIDDEN, V=v, chunk_size=train_chunk_size(v, torch.device("cpu"))
                           if path == "fused" else None, commit=commit,
                           torch=torch.__version__,
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                               timespec="minutes"))
                rows[path] = row
                print(f"V={v:6d} tokens={tokens:5d} {path:13s} median {row['median_s']:7.3f} s "
                      f"(CPU {row['median_cpu_s']:7.3f} s)"
                      f"   peak above models {row['peak_growth_bytes'] / 2**20:8.1f} MiB"
                      f"   (load {load})", flush=True)
            mem = rows["fused"]["peak_growth_bytes"] / rows["materialised"]["peak_growth_bytes"]
            tim = rows["fused"]["median_cpu_s"] / rows["materialised"]["median_cpu_s"]
            wall = rows["fused"]["median_s"] / rows["materialised"]["median_s"]
            print(f"   fused / materialised: peak {mem:.3f}, CPU time {tim:.3f} (wall {wall:.3f})",
                  flush=True)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "a") as f:
                for row in rows.values():
                    f.write(json.dumps({**row, "mem_ratio": mem, "cpu_time_ratio": tim,
                                        "wall_time_ratio": wall}) + "\n")


if __name__ == "__main__":
    main()
