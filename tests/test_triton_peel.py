"""The head peel of the Triton streaming kernels (rows not known to start on 16 bytes).

A main-loop block the kernel claims 16-byte aligned (``_at(..., ALIGNED=True)``) is loaded as
vectors on a GPU; a wrong claim is a misaligned-address fault there, and the interpreter cannot
see it (it ignores hints). So here the claim itself is checked: the interpreter runs the real
kernels with ``_at`` replaced by a Python stand-in that records the first address of every block
claimed aligned, on CPU tensors whose real addresses the layouts below make odd. The values are
checked against the float64 reference by the same pass rule as everywhere else.
"""
import itertools
import os

import pytest
import torch
from conftest import DEVICE, assert_pass_rule, matrix

import muscle_fast as mf
from muscle_fast.ops.compat_loss import triton as triton_ops
from muscle_fast.ops.compat_loss.reference import compat_loss_reference

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    or not mf.available_impls(DEVICE)["triton"].available,
    reason="needs the Triton interpreter (the check reads CPU addresses)")


def _brute_force_needs_peel(rows):
    """Every row (b, t) of every tensor, no periodicity argument: does the student's own peel
    align all of them, and does Triton's binder not already know that every row is aligned?"""
    known = all(r.data_ptr() % 16 == 0 and r.stride(0) % 16 == 0 and r.stride(1) % 16 == 0
                for r in rows)
    if known:
        return False
    z = rows[0]
    for b, t in itertools.product(range(z.shape[0]), range(z.shape[1])):
        addr = [r.data_ptr() + (b * r.stride(0) + t * r.stride(1)) * r.element_size()
                for r in rows]
        head = -addr[0] % 16
        if head % z.element_size():
            return False
        h = head // z.element_size()
        if any((a + h * r.element_size()) % 16 for a, r in zip(addr, rows)):
            return False
    return True


def _layout(shape, dtype, offset, pad):
    """A [B, T, V] view with unit stride on V, row stride V + pad, starting `offset` elements
    into its storage."""
    B, T, V = shape
    store = torch.randn(offset + B * T * (V + pad) + 8).to(dtype)
    return store[offset:offset + B * T * (V + pad)].view(B, T, V + pad)[..., :V]


LAYOUTS = [((B, T, V), d, off, pad)
           for (B, T, V) in ((2, 3, 37), (1, 20, 41), (3, 17, 64), (18, 2, 40))
           for d in (torch.bfloat16, torch.float16, torch.float32)
           for off in (0, 1, 3, 4) for pad in (0, 1, 3)]


@pytest.mark.parametrize("teacher_dtype", [None, torch.float32, torch.bfloat16])
def test_needs_peel_matches_every_row(teacher_dtype):
    """The 16 x 16 rule of `needs_peel` equals the check over every row, over many layouts
    (offsets, padded strides, B or T above 16, teachers of another dtype)."""
    seen = set()
    for (shape, dt, off, pad), (off2, pad2) in zip(LAYOUTS, itertools.cycle([(0, 0), (2, 1),
                                                                            (1, 0), (4, 3)])):
        z = _layout(shape, dt, off, pad)
        o = _layout(shape, teacher_dtype or dt, off2, pad2)
        want = _brute_force_needs_peel([z, o])
        assert triton_ops.needs_peel(z, o) == want, (shape, dt, off, pad, off2, pad2)
        seen.add(want)
    assert seen == {True, False}  # both answers occur: the comparison can fail


class _AlignmentRecorder:
    """Stands in for `triton._at` under the interpreter: the same pointers, and every block
    claimed aligned has its first address recorded."""

    def __init__(self):
        self.claims = []

    def __call__(self, row, cols, ALIGNED):
        ptrs = row + cols
        if ALIGNED:
            self.claims.append(int(ptrs.handle.data.reshape(-1)[0]))
        return ptrs

    def check(self):
        assert self.claims, "no block was claimed aligned: the peel path did not run"
        bad = [a for a in self.claims if a % 16]
        assert not bad, f"{len(bad)} of {len(self.claims)} blocks claimed aligned are not"


@pytest.fixture
def recorder(monkeypatch):
    rec = _AlignmentRecorder()
    monkeypatch.setattr(triton_ops, "_at", rec)
    return rec


@pytest.fixture(params=["loop", "one_block"])
def block_path(request, monkeypatch):
    """The row kernel's loop path on small rows (several main-loop iterations a row), or its
    one-block path (the row kept in registers, its lanes rotated by the peel)."""
    if request.param == "loop":
        monkeypatch.setattr(triton_ops, "MAX_FUSED_BLOCK_V", 16)
        monkeypatch.setattr(triton_ops, "LOOP_BLOCK_V", 16)
    return request.param


@pytest.fixture
def loop_blocks(monkeypatch):
    monkeypatch.setattr(triton_ops, "LOOP_BLOCK_V", 16)


def _inputs(B, T, V, dtype, offsets, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T, V, generator=g) * 3
    out = []
    for k, off in enumerate(offsets):
        x = base + (0.6 + 0.2 * k) * torch.randn(B, T, V, generator=g)
        view = _layout((B, T, V), dtype, off, 0)
        view.copy_(x.to(dtype))
        out.append(view)
    labels = torch.where(torch.rand(B, T, generator=g) < 0.6, base.argmax(-1),
                         torch.randint(0, V, (B, T), generator=g))
    labels[0, 1] = -100
    return out, labels


# The peel depends on the element size and the rows' phases: the default run takes both element
# sizes (bf16, fp32) at every (V, offset) with the MUSCLE mask (three tensors), and old_correct
# (no new teacher) at an aligned and a shifted layout; fp16 (bf16's element size) and
# old_correct's other layouts are in the slow run.
@pytest.mark.parametrize("mask,layout,dtype", matrix(
    ["muscle", "old_correct"],
    [pytest.param((V, off), id=f"{V}-{off}") for V, off in
     ((75, 0), (77, 0), (77, 3), (64, 5), (16, 1), (3, 0))],
    [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"),
     pytest.param(torch.float32, id="fp32")],
    slow_if=lambda mask, layout, dtype: dtype == torch.float16 or (
        mask == "old_correct" and layout not in ((75, 0), (77, 3)))))
def test_peeled_rows_are_right_and_claims_aligned(recorder, block_path, dtype, layout, mask):
    """Rows that start anywhere mod 16 bytes: an odd V on fresh tensors (the usual case: every
    row its own phase), and views `offset` elements into their storage (the student a non-leaf
    view taking the gradient in place, so that its rows and the gradient's share a phase). The
    loss, gradient and statistics against float64; every aligned claim true."""
    (V, offset), B, T = layout, 2, 5
    (z, o, w), labels = _inputs(B, T, V, dtype, [offset] * 3)
    inplace = offset != 0
    leaf = z.detach().clone().requires_grad_(True)
    if inplace:  # a non-leaf view at the same offset (an lm_head output sliced)
        n = B * T * V
        flat = torch.cat([torch.zeros(offset, dtype=dtype), leaf.reshape(-1)]) * 1
        student = flat[offset:offset + n].view(B, T, V)
    else:
        student = leaf
    new = w if mask == "muscle" else None
    assert triton_ops.needs_peel(student, o, w, student) or not inplace
    loss, stats = mf.fused_compat_loss(student, labels, o, new, mask=mask, impl="triton",
                                       return_stats=True, inplace_backward=inplace)
    loss.backward()
    z64 = z.detach().double().requires_grad_(True)
    loss64, stats64 = compat_loss_reference(z64, labels, o.double(),
                                            None if new is None else new.double(), mask=mask,
                                            return_stats=True)
    loss64.backward()
    zt = z.detach().clone().requires_grad_(True)
    loss_t, stats_t = mf.fused_compat_loss(zt, labels, o, new, mask=mask, impl="torch",
                                           return_stats=True)
    loss_t.backward()
    assert_pass_rule(loss, loss_t, loss64, dtype, "loss")
    assert_pass_rule(leaf.grad, zt.grad, z64.grad, dtype, "grad")
    for name in ("frac_to_old", "acc_student", "kl_old", "ce"):
        assert_pass_rule(getattr(stats, name), getattr(stats_t, name), getattr(stats64, name),
                         dtype, name)
    if V >= 2 * 16 + 8 or block_path == "one_block":  # a main loop runs / the vector part
        recorder.check()
    else:
        assert all(a % 16 == 0 for a in recorder.claims)


def test_inconsistent_rows_take_no_peel(recorder, block_path):
    """A bf16 student whose rows start on other 16-byte phases than its fp32 teacher's: no one
    peel aligns both, so no block is claimed aligned, and the values are still right."""
    (z,), labels = _inputs(2, 5, 77, torch.bfloat16, [1])
    (o,), _ = _inputs(2, 5, 77, torch.float32, [0], seed=1)
    assert not triton_ops.needs_peel(z, o, z)
    zz = z.detach().requires_grad_(True)
    loss = mf.fused_compat_loss(zz, labels, o, mask="old_correct", impl="triton")
    loss.backward()
    z64 = z.detach().double().requires_grad_(True)
    loss64 = compat_loss_reference(z64, labels, o.double(), mask="old_correct")
    loss64.backward()
    zt = z.detach().clone().requires_grad_(True)
    loss_t = mf.fused_compat_loss(zt, labels, o, mask="old_correct", impl="torch")
    loss_t.backward()
    assert_pass_rule(loss, loss_t, loss64, torch.bfloat16, "loss")
    assert_pass_rule(zz.grad, zt.grad, z64.grad, torch.bfloat16, "grad")
    assert recorder.claims == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_vocab_parallel_kernels_peel(recorder, loop_blocks, dtype):
    """The partials and gradient-rows kernels on an odd column slice [3, 80) of V=83 (the
    slice's rows start 3 columns into rows of 83): against their float64 torch versions."""
    from muscle_fast.ops.compat_loss.contract import N_ROW_CONSTS
    from muscle_fast.ops.compat_loss.torch_kernels import (
        compat_grad_rows_torch,
        compat_partials_torch,
    )
    (z, o, w), labels = _inputs(2, 4, 83, dtype, [0, 0, 0])
    zs, os_, ws = (x[..., 3:80] for x in (z, o, w))
    y = torch.where((labels >= 3) & (labels < 80), labels - 3, torch.full_like(labels, -1))
    y = torch.where(labels == -100, labels, y).reshape(-1)
    assert triton_ops.needs_peel(zs, os_, ws)
    kw = dict(inv_temperature=0.5, ignore_index=-100, old_at_one=True)
    got = triton_ops.compat_partials_triton(zs, y, os_, ws, **kw)
    ref = compat_partials_torch(zs.double(), y, os_.double(), ws.double(), **kw)
    same = compat_partials_torch(zs, y, os_, ws, **kw)
    assert_pass_rule(got, same, ref, dtype, "partials")
    recorder.check()
    recorder.claims.clear()
    g = torch.Generator().manual_seed(5)
    consts = torch.rand(8, N_ROW_CONSTS, generator=g, dtype=torch.float64) + 0.5
    consts[:, -1] = torch.tensor([1, 2, 0, -1, 1, 2, 1, 2], dtype=torch.float64)
    gk = dict(inv_temperature=0.5, has_kl=True, has_ce=True)
    out = torch.full_like(z, 7.0)[..., 3:80]  # the gradient in the same layout
    assert triton_ops.needs_peel(zs, os_, ws, out)
    triton_ops.compat_grad_rows_triton(zs, y, os_, ws, out, consts.float(), **gk)
    ref_g = torch.empty(zs.shape, dtype=torch.float64)
    compat_grad_rows_torch(zs.double(), y, os_.double(), ws.double(), ref_g, consts, **gk)
    same_g = torch.empty_like(zs)
    compat_grad_rows_torch(zs, y, os_, ws, same_g, consts.float(), **gk)
    assert_pass_rule(out, same_g, ref_g, dtype, "grad rows")
    recorder.check()


def test_scale_rows_peel(recorder, loop_blocks):
    """The scaling kernel on rows of 77 bf16 columns from an odd offset: exact products."""
    g = _layout((2, 3, 77), torch.bfloat16, 3, 0)
    g.copy_(torch.randn(2, 3, 77).to(torch.bfloat16))
    ref = g.clone()
    go = torch.tensor([2.0, 1.0, -0.5, 4.0, 0.25, 1.0])
    assert triton_ops.needs_peel(g)
    triton_ops.scale_rows_triton(g, go)
    assert torch.equal(g, (ref.float() * go.view(2, 3, 1)).to(torch.bfloat16))
    recorder.check()
