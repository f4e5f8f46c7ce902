"""Compiled-code report of the Triton kernels: SASS facts and a predicted time, without a GPU.

    PYTHONPATH=. python -m benchmarks.sass [--arch sm_90] [--json FILE] [--csv FILE] [--quick]

Every variant is built by calling the real launcher (``compat_loss_triton`` and friends) on
real-shaped, never-touched CPU tensors (``torch.empty``: no page is written), with Triton's
driver replaced by one that only names the target. The launcher's own ``kernel[grid](...)`` call
is turned into ``kernel.warmup(...)``: Triton's binder sees the launcher's arguments, constexprs,
num_warps and num_stages and decides i32/i64, the value-1 and divisibility-by-16 specialisations
exactly as on a GPU; nothing is retyped here. The cubin is read with the cuobjdump that Triton's
wheel bundles.

Per variant: registers, spills (local-memory stores), stack, shared memory, num_warps, CTAs per
SM and resident warps (H100 and H200 share the SM: one figure), and per loop body (a backward
branch in the SASS): instructions per column, barriers, shuffles, MUFU ops per column, global
loads/stores by width. The **predicted** time is max(bytes / HBM bandwidth, issue-slot bound,
MUFU bound, latency bound: one DRAM latency plus the barrier chain per loop iteration of each
row in flight) on each card, with the docs/SPEC.md floor's bytes over the same bandwidth divided by it as
the predicted fraction of the floor. Every predicted_* column is a model, not a measurement;
the model and its constants are in benchmarks/NOTES.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
N_HEADLINE = 8192
VOCABS = (8192, 32000, 128256, 128257, 151936)

# Model constants (NOTES.md, "Compiled-code model"). Same SM on both cards: 132 SMs, 4 warp
# schedulers issuing one instruction per clock each, 16 MUFU lanes, 64K registers, 64 warps,
# 32 CTAs, 228 KB shared memory per SM; boost clock 1.98 GHz.
SMS, CLOCK_HZ, ISSUE_PER_CLK, MUFU_PER_CLK = 132, 1.98e9, 4, 16
REGS_PER_SM, WARPS_PER_SM, CTAS_PER_SM, SMEM_PER_SM = 65536, 64, 32, 228 * 1024
# HBM bandwidth the predictions use, bytes/s: H200 as measured here (KINDS.md: a 8.6 GB
# device-to-device copy in 2.0 ms, read + write counted); H100 SXM an assumption (about 90% of
# its 3.35 TB/s datasheet figure), to be replaced by the harness's copy_gbps on a GPU.
HBM = {"h100": 3.0e12, "h200": 4.3e12}
# loaded DRAM latency for the latency bound: an assumption (not measured here)
DRAM_LATENCY_S = 0.8e-6
# a barrier of a block-wide reduction on the dependent chain of a loop iteration (barrier +
# shared-memory round trip + shuffles, about 60 clocks): an assumption (not measured here)
BAR_CHAIN_S = 60 / CLOCK_HZ

ELEM = {"bf16": 2, "fp32": 4, "fp16": 2}
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Variant:
    kernel: str  # row | row_sparse (teachers given sparsely, options k) | partials | grad_rows | scale
    V: int
    dtype: str
    mask: str = "muscle"  # row kernel: muscle (old + new) or old_correct (old only)
    grad: bool = True
    N: int = N_HEADLINE
    # launcher keywords over the benchmark's (T = 2, kl_weight 1, ce_weight 0, ...), e.g.
    # {"mask_mode": 3, "ce_weight": 0.5} or, for grad_rows, {"has_kl": False}
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        opts = "".join(f"-{k}={v}" for k, v in sorted(self.options.items()))
        return (f"{self.kernel}-{self.mask}-{'grad' if self.grad else 'fwd'}-V{self.V}-"
                f"{self.dtype}{opts}")


def default_variants(quick: bool = False) -> list:
    vocabs = (32000, 128256) if quick else VOCABS
    out = []
    for V in vocabs:
        for dt in ("bf16", "fp32"):
            for mask in ("muscle", "old_correct"):
                for grad in (True, False):
                    out.append(Variant("row", V, dt, mask, grad))
            for mask in ("muscle", "old_correct"):  # both teachers sparse; the old one only
                out.append(Variant("row_sparse", V, dt, mask, True, options={"k": 64}))
            out.append(Variant("partials", V, dt, "muscle", False))
            out.append(Variant("grad_rows", V, dt, "muscle", True))
            out.append(Variant("scale", V, dt, "-", True))
    return out


# ----------------------------------------------------------------------------- capture
class _TargetOnlyDriver:
    """Enough of Triton's driver for its binder and compiler: the target, no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True


class _Capture:
    """Stands in for a @triton.jit kernel inside the launcher: ``kernel[grid](*a, **kw)``
    becomes ``kernel.warmup(*a, grid=grid, **kw)`` (bind, specialise, compile, no launch)."""

    def __init__(self, fn, sink: list):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.fn.warmup(*args, grid=grid, **kwargs)
            consts = {k: v for k, v in kwargs.items() if k.isupper()}
            consts["_kernel"] = self.fn.__name__
            self.sink.append((compiled, consts, kwargs.get("num_warps", 4)))
        return launch


def _inputs(v: Variant):
    """Real-shaped CPU tensors, never written ([1, N, V] as the public op passes them)."""
    dt = TORCH_DTYPE[v.dtype]
    shape = (1, v.N, v.V)
    z = torch.empty(shape, dtype=dt)
    o = torch.empty(shape, dtype=dt)
    w = torch.empty(shape, dtype=dt) if v.mask == "muscle" else None
    y = torch.empty(v.N, dtype=torch.int64)
    return z, o, w, y


def compile_variant(v: Variant, tk, arch: int):
    """[(CompiledKernel, constexprs, num_warps)] that the launcher's call compiled."""
    import triton

    from muscle_fast.ops.compat_loss.contract import KERNEL_MASK_MODES, N_ROW_CONSTS
    sink: list = []
    names = ("_compat_loss_kernel", "_compat_partials_kernel", "_compat_grad_rows_kernel",
             "_scale_rows_kernel")
    saved = {n: getattr(tk, n) for n in names}
    old_driver = triton.runtime.driver._active  # None on a machine without a GPU
    triton.runtime.driver.set_active(_TargetOnlyDriver(arch))
    try:
        for n in names:
            setattr(tk, n, _Capture(saved[n], sink))
        z, o, w, y = _inputs(v)
        scale = torch.ones((), dtype=torch.float32)
        if v.kernel == "row_sparse":
            # muscle: both teachers sparse; old_correct: the old one only
            from muscle_fast.ops.compat_loss.contract import N_SPARSE_COLS, SparseRows
            kw = dict(mask_mode=int(KERNEL_MASK_MODES[v.mask]), inv_temperature=0.5,
                      kl_weight=1.0, ce_weight=0.0, ignore_index=-100, old_label_logprob=False)
            kw.update(v.options)
            k = kw.pop("k")

            def sparse():
                return SparseRows(torch.empty((v.N, k), dtype=torch.int32),
                                  torch.empty((v.N, k), dtype=torch.float32),
                                  torch.empty((v.N, N_SPARSE_COLS), dtype=torch.float32))
            tk.compat_loss_triton(z, y, None, None, None, torch.empty_like(z) if v.grad else None,
                                  scale, old_sparse=sparse(),
                                  new_sparse=sparse() if w is not None else None, **kw)
        elif v.kernel == "row":
            kw = dict(mask_mode=int(KERNEL_MASK_MODES[v.mask]), inv_temperature=0.5,
                      kl_weight=1.0, ce_weight=0.0, ignore_index=-100, old_label_logprob=False)
            kw.update(v.options)
            mask = torch.empty(v.N, dtype=torch.float32) if kw["mask_mode"] == 0 else None
            tk.compat_loss_triton(z, y, o, w, mask, torch.empty_like(z) if v.grad else None,
                                  scale, **kw)
        elif v.kernel == "partials":
            kw = dict(inv_temperature=0.5, ignore_index=-100, old_at_one=False)
            kw.update(v.options)
            tk.compat_partials_triton(z, y, o, w, **kw)
        elif v.kernel == "grad_rows":
            consts = torch.empty((v.N, N_ROW_CONSTS), dtype=torch.float32)
            kw = dict(inv_temperature=0.5, has_kl=True, has_ce=False)
            kw.update(v.options)
            tk.compat_grad_rows_triton(z, y, o, w, torch.empty_like(z), consts, **kw)
        elif v.kernel == "scale":
            tk.scale_rows_triton(z, torch.empty(v.N, dtype=torch.float32))
        else:
            raise ValueError(v.kernel)
    finally:
        triton.runtime.driver._active = old_driver
        for n in names:
            setattr(tk, n, saved[n])
    return sink


# ----------------------------------------------------------------------------- SASS
def _tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_of(cubin: bytes) -> tuple:
    """(instructions [(addr, text)], resource usage dict) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(path)
    instrs = [(int(m.group(1), 16), m.group(2)) for m in _INSTR.finditer(sass)]
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return instrs, usage


def _op(text: str) -> str:
    text = re.sub(r"^@!?U?P\w+\s+", "", text)  # predicate guard
    return text.split()[0] if text else ""


def _mem_width(op: str) -> int:
    """Bits per thread of an LDG/STG (32 when the opcode names no width)."""
    for w in (128, 64):
        if f".{w}" in op:
            return w
    return 16 if (".U16" in op or ".S16" in op) else (8 if (".U8" in op or ".S8" in op) else 32)


def loops_of(instrs: list) -> list:
    """Loop bodies [(start, end)] from backward branches, outermost first, in code order."""
    out = []
    for addr, text in instrs:
        op = _op(text)
        if op.startswith(("BRA", "JMP")):
            m = re.search(r"0x([0-9a-f]+)", text)
            if m and int(m.group(1), 16) < addr:  # (a branch to itself is the end-of-code trap)
                out.append((int(m.group(1), 16), addr))
    out.sort()
    # keep the outermost of nested ranges
    kept = []
    for lo, hi in out:
        if not any(a <= lo and hi <= b and (a, b) != (lo, hi) for a, b in out):
            kept.append((lo, hi))
    return kept


def count(instrs: list, lo: int = -1, hi: int = 1 << 62) -> dict:
    c = {"instr": 0, "bar": 0, "shfl": 0, "mufu": 0, "ldg_vec": 0, "ldg_scalar": 0,
         "stg_vec": 0, "stg_scalar": 0, "ldg_bytes": 0, "stl": 0, "ldg16": 0,
         "ldg_bytes_before_bar": 0}
    for addr, text in instrs:
        if not lo <= addr <= hi:
            continue
        op = _op(text)
        if op in ("NOP", "") or op.startswith("EXIT") and addr > hi:
            continue
        c["instr"] += 1
        if op.startswith("BAR"):
            c["bar"] += 1
        elif op.startswith("SHFL"):
            c["shfl"] += 1
        elif op.startswith("MUFU"):
            c["mufu"] += 1
        elif op.startswith("LDG"):
            w = _mem_width(op)
            c["ldg_vec" if w >= 64 else "ldg_scalar"] += 1
            c["ldg_bytes"] += w // 8
            c["ldg16"] += w <= 16
            if not c["bar"]:
                c["ldg_bytes_before_bar"] += w // 8
        elif op.startswith("STG"):
            c["stg_vec" if _mem_width(op) >= 64 else "stg_scalar"] += 1
        elif op.startswith("STL"):
            c["stl"] += 1
    return c


# ----------------------------------------------------------------------------- model
def floor_bytes(v: Variant) -> int:
    """docs/SPEC.md section 4: what must move (student + each needed teacher read, gradient written);
    for the vocabulary-parallel and scaling kernels, their own reads and writes."""
    e, NV = ELEM[v.dtype], v.N * v.V
    if v.kernel == "row_sparse":  # the student read, the gradient written, the k ids and log p
        k, n_t = v.options["k"], (2 if v.mask == "muscle" else 1)
        return NV * e * (1 + (1 if v.grad else 0)) + v.N * n_t * 8 * k
    if v.kernel == "row":
        return NV * e * (1 + (2 if v.mask == "muscle" else 1) + (1 if v.grad else 0))
    if v.kernel == "partials":
        return NV * e * (3 if v.mask == "muscle" else 2)
    if v.kernel == "grad_rows":
        return NV * e * 3
    return NV * e * 2  # scale: read + write (skipped entirely when the upstream gradient is 1)


def design_bytes(v: Variant, tk) -> int:
    if v.kernel == "row_sparse":
        return tk.design_bytes_sparse(v.N, v.V, ELEM[v.dtype], k=v.options["k"],
                                      teachers=2 if v.mask == "muscle" else 1, grad=v.grad)
    if v.kernel == "row":
        return tk.design_bytes(v.N, v.V, ELEM[v.dtype], teachers=2 if v.mask == "muscle" else 1,
                               grad=v.grad)
    return floor_bytes(v)


def occupancy(regs: int, warps: int, shared: int) -> int:
    """CTAs per SM allowed by registers (allocated per warp in units of 256), warps, CTAs, smem."""
    regs_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_warp * warps)
    by_smem = SMEM_PER_SM // shared if shared else CTAS_PER_SM
    return max(0, min(by_regs, WARPS_PER_SM // warps, CTAS_PER_SM, by_smem))


def analyse(v: Variant, compiled, consts: dict, warps: int, tk, commit: str, version: str) -> dict:
    import triton
    instrs, usage = sass_of(compiled.asm["cubin"])
    shared = int(getattr(compiled.metadata, "shared", usage.get("SHARED", 0)))
    regs = usage.get("REG", 0)
    ctas = occupancy(regs, warps, shared)
    block = int(consts.get("BLOCK_V", 1))
    single = bool(consts.get("SINGLE_BLOCK", False))
    loops = loops_of(instrs)
    per_loop = [count(instrs, lo, hi) for lo, hi in loops]
    whole = count(instrs)
    # columns an iteration of each loop covers: the kernel module says (its design), else BLOCK_V
    design = (tk.loop_columns(consts["_kernel"], block, single)
              if hasattr(tk, "loop_columns") else [])  # kernels before loop_columns: BLOCK_V
    cols_iter = [design[i] if i < len(design) else block for i in range(len(loops))]
    if v.kernel == "row_sparse":
        # the first and the last loop that load the student row (vector loads) are the
        # statistics and the gradient passes; the others (the ids walks, and the exact tail pass
        # that only rows with a tiny tail take) are counted as one iteration
        mains = [i for i, c in enumerate(per_loop) if c["ldg_vec"]]
        cols_iter = [v.V] * len(loops)
        if mains:
            cols_iter[mains[0]] = design[0]
            cols_iter[mains[-1]] = design[-1]
    cpt = [max(1.0, c / (32 * warps)) for c in cols_iter]  # columns per thread per iteration
    iters = [math.ceil(v.V / c) for c in cols_iter]
    cols_per_thread = max(1.0, (block if single else v.V) / (32 * warps))
    # warp-instructions and warp-MUFU ops per row; every loop runs its full count (a pass that
    # a row skips is counted: an upper bound); straight-line code once
    warp_instr = warps * (whole["instr"] - sum(c["instr"] for c in per_loop)
                          + sum(n * c["instr"] for n, c in zip(iters, per_loop)))
    warp_mufu = warps * (whole["mufu"] - sum(c["mufu"] for c in per_loop)
                         + sum(n * c["mufu"] for n, c in zip(iters, per_loop)))
    # latency: a loop body consumes its own loads (no software pipelining in these kernels), so
    # each iteration of a row costs at least one DRAM latency, plus the dependent chain of its
    # block-wide reductions (BAR_CHAIN_S a barrier); ctas_per_sm rows in flight an SM
    row_latency = sum(n * (DRAM_LATENCY_S + c["bar"] * BAR_CHAIN_S)
                      for n, c in zip(iters, per_loop))
    fb, db = floor_bytes(v), design_bytes(v, tk)
    rows_per_wave = max(1, ctas) * SMS
    wave_q = math.ceil(v.N / rows_per_wave) / (v.N / rows_per_wave)
    row = {
        "name": v.name, "kernel": v.kernel, "mask": v.mask, "V": v.V, "dtype": v.dtype, "grad": v.grad, "N": v.N,
        "version": version,
        "block_v": block, "single_block": single, "num_warps": warps,
        "num_stages": getattr(compiled.metadata, "num_stages", ""),
        "regs": regs, "spills": whole["stl"], "stack": usage.get("STACK", 0),
        "local": usage.get("LOCAL", 0), "shared": shared,
        "ctas_per_sm": ctas, "resident_warps": ctas * warps,
        "loops": len(loops),
        "loop_cols_per_iter": ";".join(str(c) for c in cols_iter),
        "loop_instr_per_col": ";".join(f"{c['instr'] / n:.1f}" for c, n in zip(per_loop, cpt)),
        "loop_instr": ";".join(str(c["instr"]) for c in per_loop),
        "loop_barriers": max([c["bar"] for c in per_loop], default=0),
        "loop_shfl": ";".join(str(c["shfl"]) for c in per_loop),
        "mufu_per_col": round(sum(c["mufu"] / n for c, n in zip(per_loop, cpt)), 2) if loops
        else round(whole["mufu"] / cols_per_thread, 2),
        "loop_load_bytes_per_thread": ";".join(str(c["ldg_bytes"]) for c in per_loop),
        "loop_load_bytes_before_barrier": ";".join(str(c["ldg_bytes_before_bar"])
                                                   for c in per_loop),
        "vector_loads": whole["ldg_vec"], "scalar_loads": whole["ldg_scalar"],
        "loads_16bit": whole["ldg16"],
        "loop_scalar_loads": sum(c["ldg_scalar"] for c in per_loop),
        "vector_stores": whole["stg_vec"], "scalar_stores": whole["stg_scalar"],
        "sass_instr": whole["instr"],
        "floor_bytes": fb, "design_bytes": db,
    }
    for card, bw in HBM.items():
        t_bytes = db / bw
        t_issue = wave_q * v.N * warp_instr / (ISSUE_PER_CLK * SMS * CLOCK_HZ)
        t_mufu = wave_q * v.N * warp_mufu * 32 / (MUFU_PER_CLK * SMS * CLOCK_HZ)
        t_lat = wave_q * v.N * row_latency / (SMS * max(1, ctas))
        t = max(t_bytes, t_issue, t_mufu, t_lat)
        row[f"predicted_bytes_ms_{card}"] = round(t_bytes * 1e3, 3)
        row[f"predicted_issue_ms_{card}"] = round(t_issue * 1e3, 3)
        row[f"predicted_mufu_ms_{card}"] = round(t_mufu * 1e3, 3)
        row[f"predicted_latency_ms_{card}"] = round(t_lat * 1e3, 3)
        row[f"predicted_ms_{card}"] = round(t * 1e3, 3)
        row[f"predicted_floor_fraction_{card}"] = round(fb / bw / t, 3) if t else ""
        row[f"predicted_design_fraction_{card}"] = round(t_bytes / t, 3) if t else ""
    row["triton"] = triton.__version__
    row["commit"] = commit
    return row


def git_commit() -> str:
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, cwd=HERE, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=HERE, check=False).stdout.strip()
        return (c + "+dirty") if dirty else c
    except OSError:
        return "unknown"


def report(variants: list, arch: int = 90, version: str = "current") -> list:
    os.environ.pop("TRITON_INTERPRET", None)
    from muscle_fast.ops.compat_loss import triton as tk
    if getattr(tk.triton.jit, "__module__", "").endswith("interpreter"):
        raise RuntimeError("benchmarks.sass needs the compiler: unset TRITON_INTERPRET")
    commit = git_commit()
    rows = []
    for v in variants:
        for compiled, consts, warps in compile_variant(v, tk, arch):
            rows.append(analyse(v, compiled, consts, warps, tk, commit, version))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sass", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90", help="sm_90 (H100/H200); sm_NN for another")
    ap.add_argument("--json", help="write the rows as a JSON list to this file")
    ap.add_argument("--csv", help="write (append with --append) the rows as CSV to this file")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--quick", action="store_true", help="V in 32000, 128256 only")
    ap.add_argument("--v", type=int, nargs="+", help="only these vocabularies")
    ap.add_argument("--dtype", nargs="+", choices=("bf16", "fp32"), help="only these dtypes")
    ap.add_argument("--version", default="current", help="label of the kernels in the rows")
    args = ap.parse_args(argv)
    arch = int(args.arch.removeprefix("sm_").rstrip("a"))
    variants = [v for v in default_variants(args.quick)
                if (not args.v or v.V in args.v) and (not args.dtype or v.dtype in args.dtype)]
    rows = report(variants, arch, args.version)
    cols = list(rows[0])
    w = csv.DictWriter(sys.stdout, cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    if args.csv:
        new = not (args.append and os.path.exists(args.csv))
        with open(args.csv, "a" if args.append else "w", newline="") as f:
            w = csv.DictWriter(f, cols, lineterminator="\n")
            if new:
                w.writeheader()
            w.writerows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
