"""SparseTeacher: building it, slicing it, and the k+1-category loss on every backend that takes
it (docs/SPEC.md section 2, "A teacher given sparsely")."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_pass_rule, matrix, max_err

import muscle_fast as mf
from muscle_fast import SparseTeacher
from muscle_fast.ops.compat_loss import backends
from muscle_fast.ops.compat_loss.reference import MASKS, compat_loss_reference

NINF = float("-inf")
STAT_FIELDS = ("n_valid", "frac_to_old", "acc_student", "acc_old", "acc_new", "kl_old", "kl_new",
               "ce")
# "torch_rows": the fused path with the PyTorch row function (what impl="auto" runs for sparse
# teachers until a backend's kernel takes them); "torch": the reference; then every fused
# backend whose row kernel takes sparse teachers.
FUSED = ["torch_rows"] + [
    i for i in ("native", "triton")
    if mf.available_impls(DEVICE)[i].available and backends.backend(i).sparse]
IMPLS = FUSED + ["torch"]
# Triton (interpreted, seconds a case) runs a covering part of each cross product here by
# default, its sparse row kernel being checked case by case in test_sparse_kernels.py (adversarial
# rows, every mask, both block paths); the rest of Triton's cases are in the slow run.


def _slow_triton(*keep):
    return lambda value, impl: impl == "triton" and value not in keep


@pytest.fixture
def use_impl(monkeypatch):
    """impl name -> the ``impl=`` to pass (torch_rows is reached by pinning the dispatch)."""
    from muscle_fast import _dispatch
    real = _dispatch.choose_impl

    def choose(impl, *args, **kwargs):
        return "torch_rows" if impl == "torch_rows" else real(impl, *args, **kwargs)

    monkeypatch.setattr(_dispatch, "choose_impl", choose)
    return lambda impl: impl


# ---------------------------------------------------------------------- building


def _independent_tail(logits, k, temperature):
    """log of the mass outside the top k, in float64, by sorting (not by topk)."""
    lp = F.log_softmax(logits.double() / temperature, -1)
    rest = lp.sort(-1, descending=True).values[..., k:]
    return rest.logsumexp(-1) if rest.shape[-1] else torch.full(lp.shape[:-1], NINF,
                                                                dtype=torch.float64)


def test_from_logits_matches_the_definition():
    o = torch.randn(3, 7, 50) * 3
    y = torch.randint(0, 50, (3, 7))
    y[0, :3] = -100
    t = SparseTeacher.from_logits(o, k=5, temperature=2.0, labels=y)
    assert (t.indices.dtype, t.logprobs.dtype, t.tail_logprob.dtype, t.argmax.dtype,
            t.label_logprob.dtype) == (torch.int32, torch.float32, torch.float32, torch.int64,
                                       torch.float32)
    assert t.shape == (3, 7) and t.k == 5 and t.vocab_size == 50 and t.temperature == 2.0
    lp64 = F.log_softmax(o.double() / 2.0, -1)
    assert torch.all(t.logprobs[..., :-1] >= t.logprobs[..., 1:])  # sorted, descending
    torch.testing.assert_close(t.logprobs.double(), lp64.gather(-1, t.indices.long()),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(t.logprobs.double(), lp64.sort(-1, descending=True).values[..., :5],
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(t.tail_logprob.double(), _independent_tail(o, 5, 2.0),
                               atol=1e-6, rtol=0)
    assert torch.equal(t.argmax, o.argmax(-1))
    at_label = F.log_softmax(o.double(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    want = torch.where(y == -100, 0.0, at_label)
    torch.testing.assert_close(t.label_logprob.double(), want, atol=1e-6, rtol=0)
    assert torch.equal(t.labels, y)


def test_tail_near_one_minus_sum_is_exact():
    # top-k mass 1 - 1e-12: log(1 - sum) is -inf or noise in float32, the logsumexp is exact
    o = torch.full((2, 100), -30.0)
    o[:, :3] = 0.0
    t = SparseTeacher.from_logits(o, k=3, temperature=1.0)
    want = _independent_tail(o, 3, 1.0)
    assert torch.isfinite(t.tail_logprob).all()
    torch.testing.assert_close(t.tail_logprob.double(), want, atol=0, rtol=1e-5)
    naive = torch.log1p(-t.logprobs.exp().sum(-1))
    assert not torch.allclose(naive.double(), want, rtol=1e-2)  # what the tail bucket avoids


def test_k_equal_to_vocab_has_no_tail():
    t = SparseTeacher.from_logits(torch.randn(4, 9), k=9, temperature=1.5)
    assert torch.equal(t.tail_logprob, torch.full((4,), NINF))
    torch.testing.assert_close(t.logprobs.exp().sum(-1), torch.ones(4))


def test_argmax_ties_take_the_first_index():
    o = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    t = SparseTeacher.from_logits(o, k=2, temperature=1.0)
    assert t.argmax.tolist() == [1, 0]
    assert sorted(t.indices[0].tolist()) == [1, 2]


def test_chunks_give_the_same_teacher():
    o = torch.randn(2, 9, 31)
    y = torch.randint(0, 31, (2, 9))
    a = SparseTeacher.from_logits(o, k=4, labels=y)
    b = SparseTeacher.from_logits(o, k=4, labels=y, chunk_size=1)
    for name in ("indices", "logprobs", "tail_logprob", "argmax", "label_logprob"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_masked_columns_and_low_precision_logits():
    o = torch.randn(5, 20)
    o[:, 10:] = NINF  # a masked vocabulary: only 10 finite columns
    t = SparseTeacher.from_logits(o.bfloat16(), k=12, temperature=1.0)
    assert torch.isinf(t.logprobs[:, 10:]).all() and torch.equal(t.tail_logprob,
                                                                  torch.full((5,), NINF))
    torch.testing.assert_close(t.logprobs[:, :10].exp().sum(-1), torch.ones(5))


def test_slicing_and_reshaping_follow_the_leading_shape():
    o = torch.randn(3, 6, 17)
    y = torch.randint(0, 17, (3, 6))
    t = SparseTeacher.from_logits(o, k=3, labels=y)
    cases = {
        "shift": (t[:, :-1], o[:, :-1], y[:, :-1]),
        "ellipsis": (t[..., 1:], o[..., 1:, :], y[..., 1:]),
        "row": (t[1], o[1], y[1]),
        "bool": (t[y > 8], o[y > 8], y[y > 8]),
        "flatten": (t.flatten(), o.flatten(0, 1), y.flatten()),
        "reshape": (t.reshape(2, 9), o.reshape(2, 9, 17), y.reshape(2, 9)),
        "reshape-1": (t[:, :-1].reshape(-1), o[:, :-1].reshape(-1, 17), y[:, :-1].reshape(-1)),
        "to": (t.to("cpu"), o, y),
    }
    for name, (s, logits, labels) in cases.items():
        want = SparseTeacher.from_logits(logits, k=3, labels=labels)
        assert s.shape == labels.shape, name
        for f in ("indices", "logprobs", "tail_logprob", "argmax", "label_logprob", "labels"):
            assert torch.equal(getattr(s, f), getattr(want, f)), (name, f)
        assert (s.k, s.temperature, s.vocab_size) == (3, 2.0, 17)
    assert len(t) == 3 and t.dim() == 2 and t.numel() == 18


@pytest.mark.parametrize("kwargs, exc, match", [
    pytest.param(dict(k=0), ValueError, "k must lie in", id="k0"),
    pytest.param(dict(k=18), ValueError, "k must lie in", id="k>V"),
    pytest.param(dict(k=2.0), TypeError, "k must be an int", id="k-float"),
    pytest.param(dict(k=2, temperature=0.0), ValueError, "temperature", id="T0"),
    pytest.param(dict(k=2, temperature=float("nan")), ValueError, "temperature", id="Tnan"),
    pytest.param(dict(k=2, labels=torch.full((4,), 17)), ValueError, "labels must lie",
                 id="label-range"),
    pytest.param(dict(k=2, labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels has shape",
                 id="label-shape"),
    pytest.param(dict(k=2, labels=torch.zeros(4)), TypeError, "integer", id="label-float"),
])
def test_from_logits_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SparseTeacher.from_logits(torch.randn(4, 17), **kwargs)


def _fields(n=4, k=3):
    return dict(indices=torch.zeros(n, k, dtype=torch.int32) + torch.arange(k, dtype=torch.int32),
                logprobs=torch.full((n, k), -1.5), tail_logprob=torch.full((n,), -1.0),
                argmax=torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("change, exc, match", [
    pytest.param(dict(indices=torch.zeros(4, 3, dtype=torch.long)), TypeError, "int32",
                 id="indices-dtype"),
    pytest.param(dict(logprobs=torch.zeros(4, 3, dtype=torch.float64)), TypeError, "float32",
                 id="logprobs-dtype"),
    pytest.param(dict(logprobs=torch.zeros(4, 2)), ValueError, "logprobs has shape",
                 id="logprobs-shape"),
    pytest.param(dict(tail_logprob=torch.zeros(5)), ValueError, "tail_logprob has shape",
                 id="tail-shape"),
    pytest.param(dict(argmax=torch.zeros(4, dtype=torch.int32)), TypeError, "argmax",
                 id="argmax-dtype"),
    pytest.param(dict(indices=torch.full((4, 3), 9, dtype=torch.int32)), ValueError,
                 r"indices must lie in \[0, 9\)", id="indices-range"),
    pytest.param(dict(indices=torch.zeros(4, 10, dtype=torch.int32),
                      logprobs=torch.zeros(4, 10)), ValueError, "k", id="k>V"),
    pytest.param(dict(logprobs=torch.zeros(4, 3, requires_grad=True)), ValueError,
                 "requires grad", id="requires-grad"),
    pytest.param(dict(labels=torch.zeros(4, dtype=torch.long)), ValueError,
                 "without label_logprob", id="labels-alone"),
])
def test_constructor_bad_input(change, exc, match):
    with pytest.raises(exc, match=match):
        SparseTeacher(**{**_fields(), **change}, temperature=1.0, vocab_size=9)


# ---------------------------------------------------------------------- k = V: the dense loss


def make_inputs(lead=(2, 5), vocab=29, dtype=torch.float32, n_ignored=2):
    base = torch.randn(*lead, vocab) * 3
    z = (base + torch.randn_like(base)).to(dtype)
    o = (base + 0.7 * torch.randn_like(base)).to(dtype)
    w = (base + 0.5 * torch.randn_like(base)).to(dtype)
    y = torch.where(torch.rand(lead) < 0.6, base.argmax(-1), torch.randint(0, vocab, lead))
    y.view(-1)[torch.randperm(y.numel())[:n_ignored]] = -100
    return z, y, o, w


def run(loss_fn, impl, z, upstream, **kw):
    x = z.detach().clone().requires_grad_(True)
    loss, stats = loss_fn(x, impl=impl, return_stats=True, **kw)
    loss.backward(upstream)
    return loss.detach(), x.grad, stats


def check(impl, got, same, ref, dtype):
    for what, i in (("loss", 0), ("grad", 1)):
        assert_pass_rule(got[i], same[i], ref[i], dtype, f"{impl} {what}")
    for f in STAT_FIELDS:
        a, b, r = (getattr(x[2], f) for x in (got, same, ref))
        assert (a is None) == (r is None), f
        if r is not None:
            assert_pass_rule(a, b, r, dtype, f"{impl} stat {f}")


def upstream_for(shape, dtype):
    g = torch.randn(shape)
    if dtype != torch.float32:  # powers of two: the fused gradient is stored in the logits' dtype
        g = torch.sign(g) * torch.exp2(torch.randint(-2, 3, shape).float())
    return g


def _dense_equality(use_impl, impl, dtype, mask, reduction="mean", temperature=2.0, **kw):
    z, y, o, w = make_inputs(dtype=dtype)
    so = SparseTeacher.from_logits(o, k=z.shape[-1], temperature=temperature, labels=y)
    sw = SparseTeacher.from_logits(w, k=z.shape[-1], temperature=temperature)
    opts = dict(mask=mask, reduction=reduction, temperature=temperature, **kw)
    shape = y.shape if reduction == "none" else ()
    up = upstream_for(shape, dtype)

    def dense(x, **k):
        return mf.fused_compat_loss(x, y, o.double(), w.double(), **k)

    ref = run(dense, "torch", z.double(), up.double(), **opts)
    same = run(lambda x, **k: mf.fused_compat_loss(x, y, o, w, **k), "torch", z, up, **opts)
    got = run(lambda x, **k: mf.fused_compat_loss(x, y, so, sw, **k), use_impl(impl), z, up,
              **opts)
    check(impl, got, same, ref, dtype)


@pytest.mark.parametrize("mask,impl", matrix(
    MASKS, IMPLS, slow_if=_slow_triton("muscle", "sequence_likelihood")))
def test_k_equal_to_vocab_is_the_dense_loss(use_impl, impl, mask):
    _dense_equality(use_impl, impl, torch.float32, mask)


@pytest.mark.parametrize("dtype,impl", matrix(
    [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")], IMPLS,
    slow_if=_slow_triton(torch.bfloat16)))
def test_k_equal_to_vocab_low_precision(use_impl, impl, dtype):
    _dense_equality(use_impl, impl, dtype, "muscle")


@pytest.mark.parametrize("opts,impl", matrix([
    pytest.param(dict(reduction="sum"), id="sum"),
    pytest.param(dict(reduction="none"), id="none"),
    pytest.param(dict(num_items=7), id="num_items"),
    pytest.param(dict(temperature=1.0, kl_weight=0.5, ce_weight=0.5), id="T1-ce"),
    pytest.param(dict(mask=torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 1, 1]])), id="tensor-mask"),
], IMPLS, slow_if=lambda opts, impl: impl == "triton"
    and opts.get("reduction") != "none" and "mask" not in opts))
def test_k_equal_to_vocab_every_option(use_impl, impl, opts):
    opts = dict(opts)
    _dense_equality(use_impl, impl, torch.float32, opts.pop("mask", "old_correct"), **opts)


# ---------------------------------------------------------------------- k < V: the formula


def formula64(z, so, temperature):
    """KL_i and d KL_i / d z_i of docs/SPEC.md, row by row in float64 (independent of the
    package: boolean masks over each row, the gradient written out)."""
    V = z.shape[-1]
    zz = z.double().reshape(-1, V)
    idx = so.indices.reshape(zz.shape[0], -1).long()
    lp = so.logprobs.reshape(zz.shape[0], -1).double()
    tail = so.tail_logprob.reshape(-1).double()
    kls, grads = [], []
    for i in range(zz.shape[0]):
        lq = zz[i] / temperature - torch.logsumexp(zz[i] / temperature, 0)
        q = lq.exp()
        in_k = torch.zeros(V, dtype=torch.bool)
        in_k[idx[i]] = True
        p = lp[i].exp()
        kl = sum(float(p[j] * (lp[i, j] - lq[idx[i, j]])) for j in range(idx.shape[1]) if p[j] > 0)
        g = q.clone()
        g[idx[i]] -= p
        P = float(tail[i].exp())
        if P > 0:
            if in_k.all() or torch.isinf(zz[i][~in_k]).all():
                kl = float("inf")
            else:
                log_q_tail = torch.logsumexp(lq[~in_k], 0)
                kl += P * (float(tail[i]) - float(log_q_tail))
                g[~in_k] -= P * torch.exp(lq[~in_k] - log_q_tail)
        kls.append(kl)
        grads.append(g / temperature)
    return (torch.tensor(kls, dtype=torch.float64).reshape(z.shape[:-1]),
            torch.stack(grads).reshape(z.shape))


def _case(name):
    """(student logits, teacher logits, labels, k, T) of a named case, V = 40."""
    V, lead = 40, (2, 6)
    z = torch.randn(*lead, V) * 2
    o = torch.randn(*lead, V) * 2
    y = torch.randint(0, V, lead)
    k, T = 6, 2.0
    if name == "ties":
        z = torch.randint(0, 3, z.shape).float()
        o = torch.randint(0, 3, o.shape).float()  # ties at the k boundary
    elif name == "neg_inf":
        dead = torch.rand(o.shape) < 0.3
        o[dead] = NINF
        z[dead & (torch.rand(z.shape) < 0.7)] = NINF
        z[0, 0, :] = NINF  # one row: student -inf outside K where the teacher has tail mass
        z[0, 0, o[0, 0].topk(k).indices] = 1.0
    elif name == "tail_near_0":
        top = o.topk(k, -1).indices
        o.scatter_(-1, top, 60.0)  # the tail holds ~1e-25 of the mass
    elif name == "tail_near_1":
        o = torch.randn_like(o) * 0.01
        k = 1
    elif name == "confident_student":
        # the student puts all but ~1e-26 (T=1: below float32's range) on the teacher's top k,
        # the teacher keeps 1/4 in its tail: 1 - sum_K q is 0 in float32
        T = 1.0
        top = torch.randn(*lead, V).topk(k, -1).indices
        z.scatter_(-1, top, 60.0 + torch.rand(top.shape))
        o = torch.zeros(*lead, V).scatter_(-1, top, math.log(3.0 * (V - k) / k))
    elif name == "far_student":
        # as above with gaps of ~200: every student term outside K underflows float32 relative
        # to the row max (a tail sum of exactly 0), while Q_tail = e^-200 is a float64 number
        T = 1.0
        top = torch.randn(*lead, V).topk(k, -1).indices
        z.scatter_(-1, top, 200.0 + torch.rand(top.shape))
        o = torch.zeros(*lead, V).scatter_(-1, top, math.log(3.0 * (V - k) / k))
    elif name == "k1":
        k = 1
    elif name == "all_ignored":
        y[:] = -100
    return z, o, y, k, T


CASES = ["random", "ties", "neg_inf", "tail_near_0", "tail_near_1", "confident_student",
         "far_student", "k1", "all_ignored"]


@pytest.mark.parametrize("name", CASES)
def test_reference_is_the_formula(name):
    z, o, y, k, T = _case(name)
    so = SparseTeacher.from_logits(o, k=k, temperature=T)
    kl, grad = formula64(z, so, T)
    x = z.double().requires_grad_(True)
    loss = compat_loss_reference(x, y, so, None, mask="all_old", temperature=T, reduction="none")
    valid = y != -100
    want = torch.where(valid, kl, 0.0)
    assert max_err(loss, want) <= 1e-9 * max(1.0, float(want[torch.isfinite(want)].abs().max()
                                                         if valid.any() else 1.0))
    loss.sum().backward()  # also through the rows whose KL is +inf: their gradient is finite
    # the stored p_j and P_tail sum to 1 only up to float32 rounding: the autograd gradient is
    # off by (1 - sum) q_v / T, i.e. ~1e-7 relative
    rows = valid[..., None]
    assert max_err(torch.where(rows, x.grad, 0.0), torch.where(rows, grad, 0.0)) <= 1e-6


@pytest.mark.parametrize("name,impl", matrix(
    CASES, IMPLS, slow_if=_slow_triton("ties", "far_student", "all_ignored")))
def test_k_below_vocab_matches_the_formula(use_impl, impl, name):
    z, o, y, k, T = _case(name)
    so = SparseTeacher.from_logits(o, k=k, temperature=T)
    kl, g_row = formula64(z, so, T)
    valid = y != -100
    want_loss = torch.where(valid, kl, 0.0).sum()
    up = torch.tensor(0.75)
    want_grad = torch.where(valid[..., None], g_row, 0.0) * 0.75
    opts = dict(mask="all_old", temperature=T, reduction="sum")
    same = run(lambda x, **kw: mf.fused_compat_loss(x, y, so, **kw), "torch", z, up, **opts)
    got = run(lambda x, **kw: mf.fused_compat_loss(x, y, so, **kw), use_impl(impl), z, up, **opts)
    if impl == "torch":  # the float32 reference is the pass rule's baseline: a plain bound
        for value, want in ((got[0], want_loss), (got[1], want_grad)):
            finite = want[torch.isfinite(want)].abs()
            assert max_err(value, want) <= 1e-5 * max([1.0] + finite.tolist())
    else:
        assert_pass_rule(got[0], same[0], want_loss, torch.float32, f"{name} loss")
        assert_pass_rule(got[1], same[1], want_grad, torch.float32, f"{name} grad")
    assert torch.isfinite(got[1]).all()
    if name in ("confident_student", "far_student"):  # the cases 1 - sum_K q_j gets wrong
        assert torch.isfinite(got[0]) and float(got[0]) > 1.0


@pytest.mark.parametrize("name", ["neg_inf", "far_student", "random"])
def test_torch_rows_without_compaction(use_impl, monkeypatch, name):
    """Off the CPU the row function redoes every row's tail against its own maximum (no host
    read to find the tiny ones): the same numbers."""
    from muscle_fast.ops.compat_loss import torch_rows
    z, o, y, k, T = _case(name)
    so = SparseTeacher.from_logits(o, k=k, temperature=T)
    up = torch.tensor(1.0)

    def f(x, **kw):
        return mf.fused_compat_loss(x, y, so, mask="all_old", temperature=T, reduction="sum", **kw)

    a = run(f, use_impl("torch_rows"), z, up)
    monkeypatch.setattr(torch_rows, "_compact", lambda device: False)
    b = run(f, use_impl("torch_rows"), z, up)
    assert max_err(a[0], b[0]) <= 1e-6 * max(1.0, abs(float(a[0])) if torch.isfinite(a[0]) else 1)
    assert max_err(a[1], b[1]) <= 1e-7


@pytest.mark.parametrize("mask,impl", matrix(
    MASKS, FUSED, slow_if=_slow_triton("muscle", "sequence_likelihood")))
def test_k_below_vocab_every_mask_against_ref64(use_impl, impl, mask):
    z, y, o, w = make_inputs()
    so = SparseTeacher.from_logits(o, k=4, temperature=2.0, labels=y)
    sw = SparseTeacher.from_logits(w, k=7, temperature=2.0)
    up = torch.tensor(1.5)

    def f(x, **kw):
        return mf.fused_compat_loss(x, y, so, sw, mask=mask, **kw)

    check(impl, run(f, use_impl(impl), z, up), run(f, "torch", z, up),
          run(f, "torch", z.double(), up.double()), torch.float32)


@pytest.mark.parametrize("impl", FUSED)
def test_mixed_dense_and_sparse_teachers(use_impl, impl):
    z, y, o, w = make_inputs()
    sw = SparseTeacher.from_logits(w, k=5, temperature=2.0)
    up = torch.tensor(1.0)

    def f(x, **kw):
        return mf.fused_compat_loss(x, y, o.to(x.dtype), sw, **kw)

    check(impl, run(f, use_impl(impl), z, up), run(f, "torch", z, up),
          run(f, "torch", z.double(), up.double()), torch.float32)


@pytest.mark.parametrize("impl", FUSED)
def test_inplace_backward(use_impl, impl):
    z, y, o, w = make_inputs()
    so = SparseTeacher.from_logits(o, k=5, temperature=2.0)
    sw = SparseTeacher.from_logits(w, k=5, temperature=2.0)
    ref = run(lambda x, **kw: mf.fused_compat_loss(x, y, so, sw, **kw), use_impl(impl), z,
              torch.tensor(1.0))
    leaf = z.clone().requires_grad_(True)
    x = leaf * 1  # not a leaf: the gradient overwrites it
    loss = mf.fused_compat_loss(x, y, so, sw, impl=use_impl(impl), inplace_backward=True)
    loss.backward()
    assert torch.equal(loss.detach(), ref[0]) and torch.equal(leaf.grad, ref[1])


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("mask", ["muscle", "sequence_likelihood"])
def test_fused_linear_with_sparse_teachers(use_impl, impl, mask):
    n, h, V = 11, 8, 33
    hidden = torch.randn(n, h)
    weight = torch.randn(V, h)
    y = torch.randint(0, V, (n,))
    y[3] = -100
    o = torch.randn(n, V) * 2
    so = SparseTeacher.from_logits(o, k=6, temperature=2.0, labels=y)
    sw = SparseTeacher.from_logits(hidden @ weight.t() + 0.3 * torch.randn(n, V), k=6,
                                   temperature=2.0)

    def grads(impl_, dtype):
        hh = hidden.to(dtype).clone().requires_grad_(True)
        ww = weight.to(dtype).clone().requires_grad_(True)
        loss, stats = mf.fused_linear_compat_loss(hh, ww, y, old_logits=so, new_logits=sw,
                                                  mask=mask, impl=impl_, return_stats=True,
                                                  chunk_size=4)
        loss.backward()
        return loss.detach(), hh.grad, ww.grad, stats

    got, same, ref = grads(use_impl(impl), torch.float32), grads("torch", torch.float32), \
        grads("torch", torch.float64)
    for i, what in enumerate(("loss", "grad_hidden", "grad_weight")):
        assert_pass_rule(got[i], same[i], ref[i], torch.float32, what)
    assert_pass_rule(got[3].kl_old, same[3].kl_old, ref[3].kl_old, torch.float32, "kl_old")


def test_fused_linear_runs_no_teacher_gemm(monkeypatch):
    from muscle_fast.ops.linear_compat_loss import function as lf
    calls = []
    real = lf._Linear.logits
    monkeypatch.setattr(lf._Linear, "logits", lambda self, h: calls.append(1) or real(self, h))
    n, V = 9, 21
    so = SparseTeacher.from_logits(torch.randn(n, V), k=3)
    sw = SparseTeacher.from_logits(torch.randn(n, V), k=3)
    mf.fused_linear_compat_loss(torch.randn(n, 4), torch.randn(V, 4), torch.randint(0, V, (n,)),
                                old_logits=so, new_logits=sw, chunk_size=3)
    assert len(calls) == 3  # the student's three chunks, nothing for the teachers


# ---------------------------------------------------------------------- errors and dispatch


def _loss_args():
    z, y, o, w = make_inputs()
    return z, y, SparseTeacher.from_logits(o, k=4, temperature=2.0, labels=y), \
        SparseTeacher.from_logits(w, k=4, temperature=2.0)


@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
@pytest.mark.parametrize("case, match", [
    pytest.param("temperature", "built at temperature 1.0, the loss runs at temperature=2.0",
                 id="temperature"),
    pytest.param("vocab", "vocab_size 30, the student has 29", id="vocab"),
    pytest.param("shape", "SparseTeacher of shape", id="shape"),
    pytest.param("no_labels", "built without labels", id="no-labels"),
    pytest.param("other_labels", "other labels than the loss's", id="other-labels"),
    pytest.param("process_group", "process_group=.*not supported yet", id="process-group"),
    pytest.param("device", "new_logits is on meta but the student is on cpu", id="device"),
])
def test_loss_bad_sparse_teacher(linear, case, match):
    z, y, so, sw = _loss_args()
    kw = dict(mask="muscle")
    if case == "temperature":
        so = SparseTeacher.from_logits(torch.randn(2, 5, 29), k=4, temperature=1.0)
    elif case == "vocab":
        sw = SparseTeacher.from_logits(torch.randn(2, 5, 30), k=4, temperature=2.0)
    elif case == "shape":
        sw = sw[:, :-1]
    elif case == "no_labels":
        so = SparseTeacher.from_logits(torch.randn(2, 5, 29), k=4, temperature=2.0)
        kw["mask"] = "token_likelihood"
    elif case == "other_labels":
        other = torch.where(y == -100, y, (y + 1) % 29)
        so = SparseTeacher.from_logits(torch.randn(2, 5, 29), k=4, temperature=2.0, labels=other)
        kw["mask"] = "sequence_likelihood"
    elif case == "process_group":
        kw["process_group"] = object()
    elif case == "device":
        sw = sw.to("meta")
    with pytest.raises(ValueError, match=match):
        if linear:
            hidden, weight = torch.randn(2, 5, 3), torch.randn(29, 3)
            mf.fused_linear_compat_loss(hidden, weight, y, old_logits=so, new_logits=sw, **kw)
        else:
            mf.fused_compat_loss(z, y, so, sw, **kw)


def test_other_labels_pass_without_validate():
    z, y, _, sw = _loss_args()
    other = torch.where(y == -100, y, (y + 1) % 29)
    so = SparseTeacher.from_logits(torch.randn(2, 5, 29), k=4, temperature=2.0, labels=other)
    mf.fused_compat_loss(z, y, so, sw, mask="token_likelihood", validate=False)


@pytest.fixture
def native_not_sparse(monkeypatch):
    """The dispatch as it is for a backend whose row kernel does not take sparse teachers."""
    if not mf.available_impls("cpu")["native"].available:
        pytest.skip("the native extension is not built")
    monkeypatch.setitem(backends.TAKES_SPARSE, "native", False)


def test_explicit_backend_without_sparse_kernel_raises(native_not_sparse, monkeypatch):
    z, y, so, sw = _loss_args()
    with pytest.raises(ValueError, match="impl='native' does not take a SparseTeacher yet"):
        mf.fused_compat_loss(z, y, so, sw, impl="native")
    mf.fused_compat_loss(z, y, z.detach(), z.detach(), impl="native")  # dense: as before
    monkeypatch.setenv("MUSCLE_FAST_IMPL", "native")
    with pytest.raises(ValueError, match="MUSCLE_FAST_IMPL='native' does not take a SparseTeacher"):
        mf.fused_compat_loss(z, y, so, sw)


def test_auto_without_sparse_kernel_says_so_once(native_not_sparse, caplog):
    from muscle_fast import _dispatch
    _dispatch._say_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="muscle_fast"):
        for _ in range(2):
            assert _dispatch.choose_impl("auto", torch.device("cpu"), torch.float32,
                                         sparse=True) == "torch_rows"
    said = [r for r in caplog.records if "SparseTeacher" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert _dispatch.choose_impl("auto", torch.device("cpu"), torch.float32) == "native"


def test_auto_takes_a_backend_with_sparse_kernel(monkeypatch):
    from muscle_fast import _dispatch
    if not mf.available_impls("cpu")["native"].available:
        pytest.skip("the native extension is not built")
    monkeypatch.setitem(backends.TAKES_SPARSE, "native", True)
    assert _dispatch.choose_impl("auto", torch.device("cpu"), torch.float32, sparse=True) == \
        "native"


@pytest.mark.parametrize("linear, fallback", [(False, False), (True, False), (False, True)],
                         ids=["logits", "linear", "logits-fallback"])
def test_torch_compile_fullgraph(linear, fallback, monkeypatch):
    """The sparse path traces without a graph break, also when the automatic choice falls back
    to torch_rows before any eager call has said so (a logger call inside the trace would break
    the graph)."""
    import warnings

    from muscle_fast import _dispatch
    if fallback:
        monkeypatch.setitem(backends.TAKES_SPARSE, "native", False)
        monkeypatch.setitem(backends.TAKES_SPARSE, "triton", False)
    torch._dynamo.reset()
    _dispatch._say_once.cache_clear()
    z, y, o, w = make_inputs()
    so = SparseTeacher.from_logits(o, k=4, labels=y)
    sw = SparseTeacher.from_logits(w, k=6)
    weight = torch.randn(z.shape[-1], 4)

    def step(x, so, sw):
        if linear:
            loss, stats = mf.fused_linear_compat_loss(x, weight, y, old_logits=so, new_logits=sw,
                                                      ce_weight=0.1, return_stats=True)
        else:
            loss, stats = mf.fused_compat_loss(x, y, so, sw, ce_weight=0.1, return_stats=True)
        return loss * 2.0, stats.kl_old

    x0 = torch.randn(2, 5, 4) if linear else z
    x1, x2 = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        comp = compiled(x2, so, sw)
    eager = step(x1, so, sw)
    comp[0].backward()
    eager[0].backward()
    torch.testing.assert_close(comp[0], eager[0])
    torch.testing.assert_close(comp[1], eager[1])
    torch.testing.assert_close(x2.grad, x1.grad)
