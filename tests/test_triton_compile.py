"""Every Triton kernel variant compiles for a real GPU target (sm_90), without a GPU.

The interpreter runs the kernels' Python; it does not type-check them the way the compiler does
(loop-carried types, constexpr branches). Compiling ahead of time for Hopper catches that here.
The compile runs in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit).
"""
import itertools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

VARIANTS = {
    f"{'one' if single else 'loop'}-{'new' if has_new else 'old'}-m{mode}-"
    f"{'grad' if grad else 'fwd'}-{'ce' if ce else 'kl'}-{dtype[1:]}": (single, has_new, mode, grad, ce, dtype)
    for (single, has_new, mode, grad, ce), dtype in itertools.product(
        [(False, True, 1, True, True), (True, True, 0, True, False), (False, False, 3, False, True),
         (True, False, 4, True, True), (False, True, 2, True, False), (False, True, 0, True, False)],
        ["*bf16", "*fp32", "*fp16"])
}
# vocabulary parallel: partials (block, has_new, old_at_one) and gradient (block, has_new, kl, ce)
PARTIALS = {
    f"partials-{'one' if single else 'loop'}-{'new' if has_new else 'old'}-"
    f"{'at1' if at_one else 'kt'}-{dtype[1:]}": (single, has_new, at_one, dtype)
    for (single, has_new, at_one), dtype in itertools.product(
        [(True, True, False), (False, True, True), (True, False, True), (False, False, False)],
        ["*bf16", "*fp32", "*fp16"])
}
GRAD_ROWS = {
    f"gradrows-{'one' if single else 'loop'}-{'new' if has_new else 'old'}-"
    f"{'kl' if kl else ''}{'ce' if ce else ''}-{dtype[1:]}": (single, has_new, kl, ce, dtype)
    for (single, has_new, kl, ce), dtype in itertools.product(
        [(True, True, True, True), (False, True, True, False), (True, False, False, True),
         (False, False, True, True), (False, True, False, True)],
        ["*bf16", "*fp32", "*fp16"])
}

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from muscle_fast.ops.compat_loss import triton as tk

variants = json.loads(sys.argv[1])
target = GPUTarget("cuda", 90, 32)

def signature(fn, pointers):
    sig = {}
    for name in fn.arg_names:
        if name in pointers:
            sig[name] = pointers[name]
        elif name.isupper() and name not in ("T_LEN", "V"):
            sig[name] = "constexpr"
        elif name in ("inv_t", "kl_weight", "ce_weight"):
            sig[name] = "fp32"
        else:
            sig[name] = "i64"
    return sig

def build(fn, pointers, constexprs, warps):
    try:
        k = triton.compile(ASTSource(fn=fn, signature=signature(fn, pointers), constexprs=constexprs),
                           target=target, options={"num_warps": warps})
        return "ok" if k.asm.get("cubin") else "no cubin"
    except Exception as e:
        return f"{type(e).__name__}: {e}"

out = {}
for name, (single, has_new, mode, grad, ce, dtype) in variants["row"].items():
    ptrs = {"z_ptr": dtype, "o_ptr": dtype, "w_ptr": dtype, "g_ptr": dtype, "y_ptr": "*i64",
            "m_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32"}
    block = tk.MAX_FUSED_BLOCK_V if single else tk.LOOP_BLOCK_V
    consts = {"HAS_NEW": has_new, "MASK_MODE": mode, "OLD_AT_ONE": mode == 3, "HAS_GRAD": grad,
              "HAS_KL": True, "HAS_CE": ce, "SINGLE_BLOCK": single, "BLOCK_V": block}
    out[name] = build(tk._compat_loss_kernel, ptrs, consts, tk._warps(block))
for name, (single, has_new, at_one, dtype) in variants["partials"].items():
    ptrs = {"z_ptr": dtype, "o_ptr": dtype, "w_ptr": dtype, "y_ptr": "*i64", "out_ptr": "*fp32"}
    block = tk.MAX_FUSED_BLOCK_V if single else tk.LOOP_BLOCK_V
    consts = {"HAS_NEW": has_new, "OLD_AT_ONE": at_one, "BLOCK_V": block}
    out[name] = build(tk._compat_partials_kernel, ptrs, consts, tk._warps(block))
for name, (single, has_new, kl, ce, dtype) in variants["grad_rows"].items():
    ptrs = {"z_ptr": dtype, "o_ptr": dtype, "w_ptr": dtype, "g_ptr": dtype, "y_ptr": "*i64",
            "c_ptr": "*fp32"}
    block = tk.MAX_FUSED_BLOCK_V if single else tk.LOOP_BLOCK_V
    consts = {"HAS_NEW": has_new, "HAS_KL": kl, "HAS_CE": ce, "BLOCK_V": block}
    out[name] = build(tk._compat_grad_rows_kernel, ptrs, consts, tk._warps(block))
for per_row in (True, False):
    out[f"scale-{per_row}"] = build(tk._scale_rows_kernel, {"g_ptr": "*bf16", "go_ptr": "*fp32"},
                                    {"PER_ROW": per_row, "BLOCK_V": tk.LOOP_BLOCK_V}, 16)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    variants = {"row": VARIANTS, "partials": PARTIALS, "grad_rows": GRAD_ROWS}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(variants)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "name", list(VARIANTS) + list(PARTIALS) + list(GRAD_ROWS) + ["scale-True", "scale-False"])
def test_kernel_compiles_for_sm90(compiled, name):
    assert compiled[name] == "ok", compiled[name]
