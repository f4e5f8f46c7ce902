"""The two kernels of the vocabulary-parallel loss, per backend, on one rank's column slice.

Contract: muscle_fast/ops/compat_loss/README.md ("Vocabulary parallel"). Each fused backend's
partials and gradient are checked against ``compat_*_torch`` run in float64 on the same slice,
with the pass rule of the core tests (the float32 torch run is the same-dtype baseline). Maxima and
argmax indices must be exact. The multi-rank combination is tested in test_vocab_parallel.py.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_pass_rule, max_err
from muscle_fast import available_impls
from muscle_fast.ops.compat_loss.backends import backend
from muscle_fast.ops.compat_loss.contract import Partial
from muscle_fast.ops.compat_loss.torch_kernels import compat_grad_rows_torch, compat_partials_torch
from muscle_fast.ops.compat_loss.vocab_parallel import IGNORED, NOT_OWNED

IMPLS = [i for i in ("torch", "native", "triton") if available_impls("cpu")[i].available]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EXACT_COLS = (Partial.Z_MAX, Partial.Z_ARG, Partial.O_MAX, Partial.O_ARG, Partial.W_MAX,
              Partial.W_ARG)  # maxima and argmax indices
# (V, slice): a slice in the middle, the whole row, and one long enough for Triton's loop path
SHAPES = ((37, (5, 29)), (300, (0, 300)), (9000, (100, 8800)))
B, T = 2, 4
K = 0.5  # inv_temperature


def _inputs(V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g) * 3
    o = torch.randn(B, T, V, generator=g) * 3
    w = torch.randn(B, T, V, generator=g) * 3
    z[0, 1, V // 2:] = float("-inf")  # masked vocabulary entries
    o[0, 2, : V // 3] = float("-inf")
    z[1, 0, :] = float("-inf")  # a row that is -inf on every column
    z[1, 1, 7] = z[1, 1, 20] = z[1, 1].max() + 1  # a tie: the first index wins
    z, o, w = (x.to(dtype) for x in (z, o, w))
    labels = torch.randint(0, V, (B * T,), generator=g)
    labels[3] = -100
    labels[5] = 0
    labels[6] = V - 1
    return z, o, w, labels


def _local(labels, a, b):
    owned = (labels >= a) & (labels < b)
    out = torch.where(owned, labels - a, torch.full_like(labels, NOT_OWNED))
    return torch.where(labels == -100, torch.full_like(labels, IGNORED), out).contiguous()


def _slices(xs, a, b):
    return [None if x is None else x[..., a:b] for x in xs]


def _params(flags, long_flags, inplace=(False,)):
    """Every impl x dtype x short shape x flags; the long row (Triton's loop path, several native
    chunks) once per impl, in bf16 with ``long_flags`` (slow in the Triton interpreter)."""
    out = [(i, d, s, *f, ip) for i in IMPLS for d in DTYPES for s in SHAPES[:2] for f in flags
           for ip in inplace if not (ip and d != torch.float32)]  # in place: checked in float32
    out += [(i, torch.bfloat16, SHAPES[2], *long_flags, False) for i in IMPLS]
    return [pytest.param(*p, id=f"{p[0]}-{str(p[1])[6:]}-V{p[2][0]}-" + "-".join(map(str, p[3:])))
            for p in out]


@pytest.mark.parametrize("impl,dtype,shape,has_new,old_at_one,_",
                         _params([(True, False), (False, True), (True, True)], (True, True)))
def test_partials(impl, dtype, shape, has_new, old_at_one, _):
    V, (a, b) = shape
    z, o, w, labels = _inputs(V, dtype)
    w = w if has_new else None
    y = _local(labels, a, b)
    zs, os_, ws = _slices((z, o, w), a, b)
    partials = backend(impl).partials
    kw = dict(inv_temperature=K, ignore_index=IGNORED, old_at_one=old_at_one)
    got = partials(zs, y, os_, ws, **kw)
    ref = compat_partials_torch(*(None if x is None else x.double() for x in (zs,)), y,
                                os_.double(), None if ws is None else ws.double(), **kw)
    same = compat_partials_torch(zs, y, os_, ws, **kw)
    assert got.shape == (B * T, 15) and got.dtype == torch.float32
    for c in range(15):
        if c in EXACT_COLS:
            assert max_err(got[:, c], ref[:, c]) == 0, f"column {c} must be exact"
        else:
            assert_pass_rule(got[:, c], same[:, c], ref[:, c], dtype, f"{impl} partials col {c}")
    assert torch.all(got[3] == 0), "an ignored row writes zeros"


def _consts(z, o, w, labels, sel, dtype64=True):
    """Row constants from the whole-row partials, as one rank's combination would produce them."""
    p = compat_partials_torch(z.double(), labels, o.double(), None if w is None else w.double(),
                              inv_temperature=K, ignore_index=IGNORED, old_at_one=False)
    ref = lambda m: torch.where(m == float("-inf"), torch.zeros_like(m), m)  # noqa: E731
    g = torch.Generator().manual_seed(3)
    c_kl = torch.rand(sel.shape, generator=g, dtype=torch.float64) * 2
    c_kl = torch.where(sel == 0, torch.zeros_like(c_kl), c_kl)
    c_ce = torch.rand(sel.shape, generator=g, dtype=torch.float64) - 0.5
    use_new = sel == 2
    consts = torch.stack([
        ref(p[:, Partial.Z_MAX]), p[:, Partial.Z_ST], p[:, Partial.Z_S1],
        torch.where(use_new, ref(p[:, Partial.W_MAX]), ref(p[:, Partial.O_MAX])),
        torch.where(use_new, p[:, Partial.W_S], p[:, Partial.O_S]),
        c_kl, c_ce, sel.double()], 1)
    consts[1, 5:7] = float("nan")  # an out-of-range label: the caller sets NaN, the row is NaN
    return consts


@pytest.mark.parametrize("impl,dtype,shape,has_kl,has_ce,inplace",
                         _params([(True, False), (False, True), (True, True)], (True, True),
                                 inplace=(False, True)))
def test_grad_rows(impl, dtype, shape, has_kl, has_ce, inplace):
    V, (a, b) = shape
    z, o, w, labels = _inputs(V, dtype)
    z[1, 0] = torch.randn(V).to(dtype)  # finite row: its constants come from its partials
    full_y = _local(labels, 0, V)
    sel = torch.tensor([1, 2, 0, -1, 1, 2, 1, 2])
    consts64 = _consts(z, o, w, full_y, sel)
    consts32 = consts64.float()
    y = _local(labels, a, b)
    zs, os_, ws = _slices((z, o, w), a, b)
    grad_rows = backend(impl).grad_rows
    kw = dict(inv_temperature=K, has_kl=has_kl, has_ce=has_ce)
    zin = zs.clone()
    got = zin if inplace else torch.full_like(zs, 7.0)
    grad_rows(zin, y, os_, ws, got, consts32, **kw)
    ref = torch.empty(zs.shape, dtype=torch.float64)
    compat_grad_rows_torch(zs.double(), y, os_.double(), ws.double(), ref, consts64, **kw)
    same = torch.empty_like(zs)
    compat_grad_rows_torch(zs, y, os_, ws, same, consts32, **kw)
    assert got.dtype == dtype
    assert torch.isnan(got[0, 1]).all(), "a NaN constant makes the row NaN"
    assert torch.all(got[0, 3] == 0), "an ignored row gets zeros"
    keep = torch.ones(B * T, dtype=torch.bool)
    keep[1] = False
    assert_pass_rule(got.reshape(B * T, -1)[keep], same.reshape(B * T, -1)[keep],
                     ref.reshape(B * T, -1)[keep], dtype, f"{impl} grad rows")
