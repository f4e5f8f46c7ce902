"""Facts of the compiled code a real launch runs (sm_90), checked without a GPU.

The interpreter runs the kernels' Python; it does not type-check them the way the compiler does
(loop-carried types, constexpr branches), and it says nothing about the machine code. Here each
variant is compiled through its launcher and Triton's own launch binder (benchmarks/sass.py:
the constexprs, num_warps, i32/i64 and divisibility specialisations of a real call at the
benchmark shapes), and facts of its SASS are asserted: no spills, vectorised row loads, and the
register and barrier budgets of the design. No timing is asserted (predictions live in
benchmarks/results/sass_sm90.csv). The compile runs in a subprocess without TRITON_INTERPRET
(the interpreter replaces @triton.jit); Triton's cache makes a second run cheap.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HEADLINE = "row-muscle-grad-V128256-bf16"
# (kernel, V, dtype, mask, grad, launcher options): the headline and its neighbours, plus one
# variant per constexpr branch a launch can take (mask codes, CE on, KL off, fp16, one block)
VARIANTS = [
    ("row", 128256, "bf16", "muscle", True, {}),
    ("row", 128257, "bf16", "muscle", True, {}),
    ("row", 32000, "fp32", "old_correct", False, {}),
    ("row", 32000, "fp16", "muscle", True, {"mask_mode": 3, "ce_weight": 0.5}),
    ("row", 32000, "bf16", "old_correct", True, {"mask_mode": 0, "kl_weight": 0.0,
                                                 "ce_weight": 1.0}),
    ("row", 4096, "fp32", "old_correct", True, {"mask_mode": 4, "old_label_logprob": True}),
    ("partials", 32000, "bf16", "muscle", False, {"old_at_one": True}),
    ("grad_rows", 32000, "bf16", "muscle", True, {"has_ce": True}),
    # rows of odd length: the head peel keeps the main loops' loads vectors
    ("partials", 32001, "bf16", "muscle", False, {}),
    ("grad_rows", 32001, "bf16", "muscle", True, {"has_ce": True}),
    ("scale", 32001, "bf16", "-", True, {}),
    ("row", 8191, "bf16", "muscle", True, {}),
    # sparse teachers (top-k + tail): both, the old one only at an odd V (the head peel), fwd
    ("row_sparse", 128256, "bf16", "muscle", True, {"k": 64}),
]
# The same branches at other shapes and dtypes: in the slow run (a cold compile of every variant
# takes 28 s on the 2-core Intel Xeon, 12 s from Triton's cache)
SLOW_VARIANTS = [
    ("row", 8192, "bf16", "muscle", True, {"ce_weight": 0.5}),
    ("partials", 8192, "fp32", "old_correct", False, {}),
    ("grad_rows", 8192, "fp32", "old_correct", True, {"has_kl": False, "has_ce": True}),
    ("scale", 32000, "bf16", "-", True, {}),
    ("row", 128257, "fp32", "old_correct", True, {}),
    ("row", 4095, "fp32", "old_correct", False, {}),
    ("row_sparse", 32001, "bf16", "old_correct", True, {"k": 64}),
    ("row_sparse", 32000, "fp32", "muscle", False, {"k": 2048}),
]

SCRIPT = r"""
import json, sys
from benchmarks import sass
vs = [sass.Variant(k, V, dt, mask, grad, options=opts) for k, V, dt, mask, grad, opts
      in json.loads(sys.argv[1])]
print(json.dumps(sass.report(vs)))
"""


@pytest.fixture(scope="module")
def compiled(request):
    """The facts of the variants this run's tests ask for (slow ones only when selected)."""
    here, wanted = os.path.abspath(__file__), set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and os.path.abspath(str(item.path)) == here:
            wanted.add(callspec.params.get("name"))
    variants = VARIANTS + [v for v in SLOW_VARIANTS if _name(v) in wanted]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, said out loud
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(variants)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=root, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return {r["name"]: r for r in rows}


def _name(v):
    kernel, V, dt, mask, grad, opts = v
    o = "".join(f"-{k}={x}" for k, x in sorted(opts.items()))
    return f"{kernel}-{mask}-{'grad' if grad else 'fwd'}-V{V}-{dt}{o}"


NAMES = [pytest.param(_name(v), id=_name(v), marks=[pytest.mark.slow] if v in SLOW_VARIANTS
                      else []) for v in VARIANTS + SLOW_VARIANTS]


@pytest.mark.parametrize("name", NAMES)
def test_compiles_without_spills(compiled, name):
    r = compiled[name]
    assert r["spills"] == 0 and r["local"] == 0 and r["stack"] == 0
    assert r["regs"] <= 255


@pytest.mark.parametrize("name", NAMES)
def test_loop_bodies_have_no_barrier_and_no_shuffle(compiled, name):
    """The design's budget: per-lane running state, reduced once per row, so no block-wide
    reduction (barrier or warp shuffle) runs inside a loop over the vocabulary."""
    r = compiled[name]
    assert r["loop_barriers"] == 0
    assert all(x == "0" for x in str(r["loop_shfl"]).split(";") if x)


def test_headline_occupancy(compiled):
    """At least 2 CTAs an SM at the headline shape (rows in flight to hide DRAM latency), and the
    two loops there: the statistics pass, then the gradient pass."""
    r = compiled[HEADLINE]
    assert r["ctas_per_sm"] >= 2, r["regs"]
    assert r["loops"] == 2
    for name in ("partials-muscle-fwd-V32000-bf16-old_at_one=True",
                 "grad_rows-muscle-grad-V32000-bf16-has_ce=True",
                 "row_sparse-muscle-grad-V128256-bf16-k=64"):
        assert compiled[name]["ctas_per_sm"] >= 2, name


@pytest.mark.parametrize("name", NAMES)
def test_row_loads_are_vectorised(compiled, name):
    """Every load inside a loop body is 64 or 128 bits wide, whatever V: an odd V takes the head
    peel (the masked columns before the student row's first 16-byte boundary), so the main loop
    starts aligned. When V keeps every row 16-byte aligned (V % 8 == 0 for 2-byte types, V % 4
    for fp32: the binder marks the strides divisible) the masked head and tail are vectors too,
    and the only element-wide loads are the label logits z[y] (and o[y])."""
    r = compiled[name]
    if r["kernel"] == "row_sparse":
        # in the loops, besides the student's vector loads, only the ids walks' uniform 32-bit
        # loads: 8 in the statistics loop (2 blocks x 2 teachers x the id before and inside a
        # walk), 6 in the gradient loop (an id and its log p), 8 in the tail block's walks
        # (loops of their own), 2 in each exact tail pass (rows with a tiny tail), 1-2 in the
        # head peel's walks (odd V); element-wide student loads: z[y] and each teacher's z[ids]
        assert r["loop_scalar_loads"] <= 28
    else:
        assert r["loop_scalar_loads"] == 0
    if r["V"] % (8 if r["dtype"] != "fp32" else 4) == 0:
        assert r["loads_16bit"] <= (3 if r["kernel"] == "row_sparse" else 2)
    assert r["vector_loads"] >= 1


@pytest.mark.parametrize("name", [p for p in NAMES if p.values[0].startswith("row-") and
                                  int(p.values[0].split("-V")[1].split("-")[0]) <= 8192 and
                                  int(p.values[0].split("-V")[1].split("-")[0]) % 2])
def test_one_block_odd_rows_are_vectorised(compiled, name):
    """A row kept in one block (V <= 8192) of odd length: its aligned middle is read with
    vector loads and only its head and tail (at most 7 + 7 columns, one small block) and the
    label logits element by element; unpeeled, every row load of such a row is element-wide
    (49 loads a thread at V=8191, bf16, muscle)."""
    r = compiled[name]
    assert r["single_block"] in (True, "True")
    assert r["vector_loads"] >= 3
    assert r["scalar_loads"] <= 6
