"""The fused row kernels with a sparse teacher (README.md beside the kernels, "Sparse teachers").

tests/test_sparse_teacher.py runs every backend through the public loss on short rows. Here the
rows are long enough for the native kernel's 1024-column chunks (ids in several chunks) and for
Triton's loop path (16-column blocks), with the adversarial rows of the k+1-category loss: ties,
-inf columns, a student with no mass outside K, tail mass near 0 and near 1, k = 1, k = V, and
a student far from 0. Checked against the float64 reference with the pass rule, and row kernel
against the PyTorch row function (``torch_rows``) column by column.
"""
import math

import pytest
import torch
from conftest import DEVICE, matrix
from test_sparse_teacher import check, run, upstream_for

import muscle_fast as mf
from muscle_fast import SparseTeacher
from muscle_fast.ops.compat_loss import backends
from muscle_fast.ops.compat_loss import triton as triton_ops
from muscle_fast.ops.compat_loss.contract import KERNEL_MASK_MODES, Stat, sparse_rows
from muscle_fast.ops.compat_loss.torch_rows import compat_loss_torch_rows

NINF = float("-inf")
KERNELS = [i for i in ("native", "triton")
           if mf.available_impls(DEVICE)[i].available and backends.backend(i).sparse]
# (impl, Triton path, V): native rows over 3 chunks; Triton's one-block path and its loop of
# 16-column blocks (the interpreter runs a few ms a block: short rows there)
PATHS = [pytest.param(i, p, v, id=f"{i}-{p}-V{v}") for i in KERNELS
         for p, v in ((("-", 2500),) if i == "native" else (("fused", 97), ("loop", 97)))]


@pytest.fixture
def path(monkeypatch):
    def use(block_path):
        if block_path == "loop":
            monkeypatch.setattr(triton_ops, "MAX_FUSED_BLOCK_V", 16)
            monkeypatch.setattr(triton_ops, "LOOP_BLOCK_V", 16)
    return use


def adversarial(V, k, lead=(2, 5), seed=0):
    """Student, teacher logits and labels with one adversarial row per token position."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*lead, V, generator=g) * 3
    z = base + torch.randn(*lead, V, generator=g)
    o = base + 0.7 * torch.randn(*lead, V, generator=g)
    y = torch.randint(0, V, lead, generator=g)
    top = o.topk(k, -1).indices
    z[0, 0] = torch.randint(0, 3, (V,), generator=g).float()  # ties in the student ...
    o[0, 0] = torch.randint(0, 3, (V,), generator=g).float()  # ... and at the top-k boundary
    dead = torch.rand(V, generator=g) < 0.3
    o[0, 1, dead] = NINF  # -inf columns in both
    z[0, 1, dead & (torch.rand(V, generator=g) < 0.6)] = NINF
    z[0, 2] = NINF  # the student has nothing outside K, where the teacher has tail mass
    z[0, 2].scatter_(0, top[0, 2], 1.0)
    o[0, 3].scatter_(0, top[0, 3], 60.0)  # tail mass ~1e-25
    o[0, 4] = 0.01 * torch.randn(V, generator=g)  # tail mass near 1
    z[1, 0].scatter_(0, top[1, 0], 60.0)  # 1 - sum_K q is 0 in float32 at T = 1
    z[1, 1] = z[1, 1] + 1e10  # a student far from 0
    y[1, 2] = -100
    return z, o, y


SLOW = pytest.mark.slow
# (k, T): every k at T = 2 and k = 7 at T = 1 by default; the rest in the slow run
K_T = [pytest.param(7, 1.0, id="k7-T1"), pytest.param(7, 2.0, id="k7-T2"),
       pytest.param(1, 2.0, id="k1-T2"), pytest.param("V", 2.0, id="kV-T2"),
       pytest.param(1, 1.0, id="k1-T1", marks=SLOW), pytest.param("V", 1.0, id="kV-T1", marks=SLOW)]
# (dtype, mask): every mask in float32, bfloat16 with muscle; the rest in the slow run
DTYPE_MASK = [pytest.param(torch.float32, m, id=f"fp32-{m}")
              for m in ("muscle", "token_likelihood", "old_correct")]
DTYPE_MASK += [pytest.param(torch.bfloat16, "muscle", id="bf16-muscle")]
DTYPE_MASK += [pytest.param(torch.bfloat16, m, id=f"bf16-{m}", marks=SLOW)
               for m in ("token_likelihood", "old_correct")]


# Triton's one-block path: k = 7 and k = V at T = 2 by default (the loop path takes every k)
@pytest.mark.parametrize("impl,block_path,V,k,temperature", matrix(
    PATHS, K_T, slow_if=lambda impl, block_path, V, k, T: block_path == "fused"
    and (k, T) not in ((7, 2.0), ("V", 2.0))))
def test_adversarial_rows_against_ref64(impl, block_path, V, k, temperature, path):
    path(block_path)
    k = V if k == "V" else k
    z, o, y = adversarial(V, k)
    so = SparseTeacher.from_logits(o, k=k, temperature=temperature, labels=y)
    up = torch.tensor(0.75)

    def f(x, **kw):
        return mf.fused_compat_loss(x, y, so, mask="all_old", temperature=temperature,
                                    ce_weight=0.25, reduction="sum", **kw)

    got = run(f, impl, z, up)
    check(impl, got, run(f, "torch", z, up), run(f, "torch", z.double(), up.double()),
          torch.float32)
    assert torch.isfinite(got[1]).all()


# Triton's one-block path: MUSCLE (both teachers) by default (the loop path takes every mask)
@pytest.mark.parametrize("impl,block_path,V,dtype,mask", matrix(
    PATHS, DTYPE_MASK, slow_if=lambda impl, block_path, V, dtype, mask: block_path == "fused"
    and mask != "muscle"))
def test_two_sparse_teachers_every_mask(impl, block_path, V, dtype, mask, path):
    path(block_path)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 4, V, generator=g) * 3
    z = (base + torch.randn(3, 4, V, generator=g)).to(dtype)
    y = torch.where(torch.rand(3, 4, generator=g) < 0.6, base.argmax(-1),
                    torch.randint(0, V, (3, 4), generator=g))
    y[0, 1] = -100
    so = SparseTeacher.from_logits(base + 0.7 * torch.randn(3, 4, V, generator=g), k=9,
                                   temperature=2.0, labels=y)
    sw = SparseTeacher.from_logits(base + 0.5 * torch.randn(3, 4, V, generator=g), k=4,
                                   temperature=2.0)
    up = upstream_for((), dtype)

    def f(x, **kw):
        return mf.fused_compat_loss(x, y, so, sw, mask=mask, ce_weight=0.5, **kw)

    check(impl, run(f, impl, z, up), run(f, "torch", z, up),
          run(f, "torch", z.double(), up.double()), dtype)


@pytest.mark.parametrize("impl,block_path,V", PATHS)
def test_k_equal_to_vocab_is_the_dense_row_kernel(impl, block_path, V, path):
    """k = V: the same row statistics and gradient as the dense teacher, from the same kernel."""
    path(block_path)
    z, o, y = adversarial(V, V)
    z, o = z[1:], o[1:]  # rows without -inf teachers (k = V keeps -inf ids in K: fine, but
    y = y[1:]            # the dense teacher's argmax over -inf rows is another convention)
    so = SparseTeacher.from_logits(o, k=V, temperature=2.0, labels=y)
    rows_of = backends.backend(impl).rows
    opts = dict(mask_mode=int(KERNEL_MASK_MODES["token_likelihood"]), inv_temperature=0.5,
                kl_weight=1.0, ce_weight=0.5, ignore_index=-100, old_label_logprob=True)
    zz, yy, scale = z.reshape(1, -1, V), y.reshape(-1).contiguous(), torch.tensor(1.0)
    g_dense, g_sparse = torch.empty_like(zz), torch.empty_like(zz)
    dense = rows_of(zz, yy, o.reshape(1, -1, V), None, None, g_dense, scale, **opts)
    sparse = rows_of(zz, yy, None, None, None, g_sparse, scale, old_sparse=sparse_rows(so),
                     **opts)
    for c in Stat:
        tol = 0 if c in (Stat.TO_OLD, Stat.HIT_STUDENT, Stat.HIT_OLD) else 2e-6
        assert torch.allclose(sparse[:, c], dense[:, c], rtol=tol, atol=tol), c.name
    assert torch.allclose(g_sparse, g_dense, rtol=0, atol=2e-7)


@pytest.mark.parametrize("impl,block_path,V,mode", matrix(
    PATHS, ["muscle", "old_correct", "token_likelihood", "all_old"],
    slow_if=lambda impl, block_path, V, mode: block_path == "fused" and mode != "muscle"))
def test_row_kernel_equals_torch_rows(impl, block_path, V, mode, path):
    """Every row statistic and the gradient, one sparse and one dense teacher, in place."""
    path(block_path)
    z, o, y = adversarial(V, 5, seed=3)
    w = o + 0.3 * torch.randn_like(o).nan_to_num()
    w = torch.where(torch.isinf(o), w.new_tensor(0.0), w)
    so = SparseTeacher.from_logits(o, k=5, temperature=2.0, labels=y)
    opts = dict(mask_mode=int(KERNEL_MASK_MODES[mode]), inv_temperature=0.5, kl_weight=1.0,
                ce_weight=0.5, ignore_index=-100, old_label_logprob=False)
    V_ = z.shape[-1]
    yy, scale = y.reshape(-1).contiguous(), torch.tensor(2.0)
    outs = []
    for fn in (backends.backend(impl).rows, compat_loss_torch_rows):
        zz = z.reshape(1, -1, V_).clone()
        rows = fn(zz, yy, None, w.reshape(1, -1, V_), None, zz, scale,
                  old_sparse=sparse_rows(so), **opts)
        outs.append((rows, zz))
    (r, g), (r_ref, g_ref) = outs
    for c in Stat:
        a, b = r[:, c], r_ref[:, c]
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        close = torch.isclose(a, b, rtol=2e-5, atol=2e-5)
        assert bool((same | close).all()), (c.name, a, b)
    fin = torch.isfinite(g_ref)
    assert torch.equal(fin, torch.isfinite(g))
    assert torch.allclose(g[fin], g_ref[fin], rtol=1e-4, atol=1e-6)
    assert math.isfinite(float(r[:, Stat.CE].nan_to_num(0).sum()))
