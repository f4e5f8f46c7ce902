"""fused_compat_loss: every fused backend against the float64 reference, every option."""
import math
import warnings

import pytest
import torch
from conftest import DEVICE, assert_pass_rule, matrix

import muscle_fast as mf
from muscle_fast.ops.compat_loss import triton as triton_ops
from muscle_fast.ops.compat_loss.reference import MASKS, compat_loss_reference

FUSED = [i for i in ("triton", "native") if mf.available_impls(DEVICE)[i].available]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
STAT_FIELDS = ("n_valid", "frac_to_old", "acc_student", "acc_old", "acc_new", "kl_old", "kl_new", "ce")


def make_inputs(lead=(9,), vocab=37, dtype=torch.float32, scale=3.0, n_ignored=2, new=True):
    """Student close to the teachers (as after fine-tuning), labels mostly the teachers' argmax."""
    base = torch.randn(*lead, vocab, device=DEVICE) * scale
    logits = (base + torch.randn_like(base)).to(dtype)
    old = (base + 0.7 * torch.randn_like(base)).to(dtype)
    new_ = (base + 0.5 * torch.randn_like(base)).to(dtype) if new else None
    labels = torch.where(torch.rand(lead, device=DEVICE) < 0.6, base.argmax(-1),
                         torch.randint(0, vocab, lead, device=DEVICE))
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), device=DEVICE)[:n_ignored]] = -100
    return logits, labels, old, new_


def random_upstream(shape, dtype):
    """A random upstream gradient. For bf16/fp16 logits its values are signed powers of two:
    the fused backends store the gradient in the logits' dtype during the forward and scale it
    in the backward, so any other factor rounds twice (see test_non_power_of_two_upstream_bf16,
    which bounds that separately); a power of two scales exactly."""
    g = torch.randn(shape, device=DEVICE)
    if dtype in (torch.bfloat16, torch.float16):
        g = torch.sign(g) * torch.exp2(torch.randint(-2, 3, shape, device=DEVICE).float())
    return g


def run(impl, logits, labels, old, new, upstream=None, **kw):
    """(loss, grad, stats) of one call, the gradient taken with ``upstream`` as dloss."""
    z = logits.detach().clone().requires_grad_(True)
    loss, stats = mf.fused_compat_loss(z, labels, old, new, impl=impl, return_stats=True, **kw)
    if upstream is None:
        upstream = random_upstream(loss.shape, logits.dtype)
    loss.backward(upstream.to(loss.dtype))
    return loss.detach(), z.grad, stats, upstream


def check_case(impl, logits, labels, old, new, **kw):
    """The pass rule for loss, gradient and every stat, against ref64 and the same-dtype torch run."""
    dtype = logits.dtype
    loss, grad, stats, up = run(impl, logits, labels, old, new, **kw)
    loss_t, grad_t, stats_t, _ = run("torch", logits, labels, old, new, upstream=up, **kw)
    z64 = logits.detach().double().requires_grad_(True)
    old64 = old.double()
    new64 = None if new is None else new.double()
    kw64 = {k: v for k, v in kw.items() if k not in ("inplace_backward", "validate")}
    loss64, stats64 = compat_loss_reference(z64, labels, old64, new64, return_stats=True, **kw64)
    loss64.backward(up.double())
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_pass_rule(loss, loss_t, loss64, dtype, f"{impl} loss")
    assert_pass_rule(grad, grad_t, z64.grad, dtype, f"{impl} grad")
    for name in STAT_FIELDS:
        got, want = getattr(stats, name), getattr(stats64, name)
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.dtype == torch.float32 and got.dim() == 0, name
            assert_pass_rule(got, getattr(stats_t, name), want, dtype, f"{impl} stats.{name}")
    return loss, grad, stats


@pytest.fixture(params=[pytest.param("fused", id="fused"), pytest.param("loop", id="loop")])
def block_path(request, monkeypatch):
    """Triton: the one-block path (row kept in registers) or the two-pass loop over blocks."""
    if request.param == "loop":
        monkeypatch.setattr(triton_ops, "MAX_FUSED_BLOCK_V", 16)
        monkeypatch.setattr(triton_ops, "LOOP_BLOCK_V", 16)
    return request.param


# --------------------------------------------------------------------------- the matrix


# Triton (interpreted) on every mask in float32 and on MUSCLE in every dtype by default; native
# on all of it; the rest of Triton's cross product in the slow run
@pytest.mark.parametrize("mask,dtype,impl", matrix(
    MASKS, DTYPES, FUSED,
    slow_if=lambda mask, dtype, impl: impl == "triton" and dtype != torch.float32
    and mask != "muscle"))
def test_masks(impl, dtype, mask, block_path):
    logits, labels, old, new = make_inputs((3, 5), 37, dtype)
    check_case(impl, logits, labels, old, new, mask=mask, ce_weight=0.25)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("mask", ["old_correct", "all_old", "tensor"])
def test_without_new_teacher(impl, mask):
    logits, labels, old, _ = make_inputs((11,), 29, new=False)
    m = torch.rand(11, device=DEVICE) < 0.5 if mask == "tensor" else mask
    loss, _, stats = check_case(impl, logits, labels, old, None, mask=m)
    assert stats.acc_new is None and stats.kl_new is None


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_caller_mask_tensor(impl, dtype):
    logits, labels, old, new = make_inputs((2, 6), 41, dtype)
    m = (torch.rand(2, 6, device=DEVICE) < 0.5).to(torch.int64)
    _, _, stats = check_case(impl, logits, labels, old, new, mask=m)
    valid = labels != -100
    assert math.isclose(float(stats.frac_to_old), float(m[valid].float().mean()), abs_tol=1e-6)


@pytest.mark.parametrize("impl", FUSED)
def test_sequence_ids_packed(impl, block_path):
    logits, labels, old, new = make_inputs((2, 8), 23)
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [2, 2, 5, 5, 5, 5, 6, 6]], device=DEVICE)
    check_case(impl, logits, labels, old, new, mask="sequence_likelihood", sequence_ids=seq)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(impl, reduction):
    logits, labels, old, new = make_inputs((4, 3), 19)
    loss, _, _ = check_case(impl, logits, labels, old, new, reduction=reduction, ce_weight=0.5)
    if reduction == "none":
        assert loss.shape == (4, 3) and bool((loss[labels == -100] == 0).all())


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("num_items", [pytest.param(37, id="int"), pytest.param("tensor", id="tensor")])
def test_num_items(impl, num_items):
    logits, labels, old, new = make_inputs((10,), 17)
    n = torch.tensor(37, device=DEVICE) if num_items == "tensor" else num_items
    loss, _, _ = check_case(impl, logits, labels, old, new, num_items=n)
    summed = mf.fused_compat_loss(logits, labels, old, new, impl=impl, reduction="sum")
    assert math.isclose(float(loss), float(summed) / 37, rel_tol=1e-6)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.7, 0.3), (0.0, 1.0), (2.5, 0.0)], ids=str)
def test_temperature_and_weights(impl, temperature, weights):
    logits, labels, old, new = make_inputs((7,), 33)
    kl_w, ce_w = weights
    check_case(impl, logits, labels, old, new, temperature=temperature, kl_weight=kl_w,
               ce_weight=ce_w)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize(
    "lead,vocab",
    [
        pytest.param((1,), 64, id="N=1"),
        pytest.param((5,), 1, id="V=1"),
        pytest.param((6,), 7, id="V=7"),
        pytest.param((3,), 1271, id="V=1271"),
        pytest.param((2, 2), 300, id="BTV"),
        pytest.param((0,), 11, id="N=0"),
    ],
)
def test_shapes(impl, lead, vocab, block_path):
    n_ignored = 1 if lead[0] > 1 else 0
    logits, labels, old, new = make_inputs(lead, vocab, n_ignored=n_ignored)
    check_case(impl, logits, labels, old, new, ce_weight=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("vocab", [32000, 128256, 151936])
def test_llm_vocabularies(impl, vocab):
    logits, labels, old, new = make_inputs((64,), vocab, torch.bfloat16, n_ignored=8)
    check_case(impl, logits, labels, old, new, ce_weight=0.1)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("impl", FUSED)
def test_all_ignored_is_zero(impl):
    logits, labels, old, new = make_inputs((4,), 13)
    labels[:] = -100
    loss, grad, stats = check_case(impl, logits, labels, old, new, ce_weight=0.5)
    assert float(loss) == 0.0 and not grad.any() and float(stats.n_valid) == 0
    assert all(float(getattr(stats, f)) == 0 for f in STAT_FIELDS)


@pytest.mark.parametrize("impl", FUSED)
def test_custom_ignore_index(impl):
    logits, labels, old, new = make_inputs((9,), 13, n_ignored=0)
    labels[labels == 5] = 6
    labels[:3] = 5
    _, grad, stats = check_case(impl, logits, labels, old, new, ignore_index=5)
    assert float(stats.n_valid) == 6 and not grad[:3].any()


@pytest.mark.parametrize("impl", FUSED)
def test_argmax_ties_take_first_index(impl, block_path):
    v = 40
    logits = torch.zeros(4, v, device=DEVICE)
    logits[:, [3, 20, 35]] = 5.0  # ties across blocks in the loop path
    old = logits.clone()
    old[:, 3] = 4.0
    labels = torch.tensor([3, 20, 35, 3], device=DEVICE)
    _, _, stats = check_case(impl, logits, labels, old, old.clone(), mask="muscle")
    # the student's argmax is column 3: right only for rows 0 and 3; old's is 20: row 1
    assert float(stats.acc_student) == 0.5 and float(stats.acc_old) == 0.25
    assert float(stats.frac_to_old) == 0.5


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_vocabulary_columns(impl, dtype, block_path):
    logits, labels, old, new = make_inputs((6,), 45, dtype)
    cols = [0, 17, 18, 44]
    for t in (logits, old, new):
        t[:, cols] = float("-inf")
    labels[torch.isin(labels, torch.tensor(cols, device=DEVICE))] = 1
    loss, grad, _ = check_case(impl, logits, labels, old, new, ce_weight=0.3)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and not grad[:, cols].any()


@pytest.mark.parametrize("impl", FUSED)
def test_teachers_of_two_dtypes(impl, block_path):
    """old and new in different dtypes (each teacher has its own): the gradient pass reads the
    selected teacher in its own dtype, row by row."""
    logits, labels, old, new = make_inputs((2, 5), 37, torch.bfloat16)
    check_case(impl, logits, labels, old.float(), new, mask="muscle", ce_weight=0.25)


@pytest.mark.parametrize("impl", FUSED)
def test_teacher_only_masked_column(impl):
    """A column where only the teacher is -inf: p_t = 0 there, the KL stays finite and exact."""
    logits, labels, old, new = make_inputs((5,), 21)
    old[:, 4] = float("-inf")
    loss, _, _ = check_case(impl, logits, labels, old, new, mask="all_old")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("impl", FUSED)
def test_pure_ce_ignores_a_dead_teacher(impl, block_path):
    """kl_weight=0 leaves the KL term out of the gradient too: a teacher row that is -inf on every
    column (its softmax is NaN) must not reach a pure cross-entropy gradient as 0 * NaN."""
    logits, labels, old, new = make_inputs((4,), 37, n_ignored=0)
    old[0] = float("-inf")
    loss, grad, _ = check_case(impl, logits, labels, old, new, mask="all_old", kl_weight=0.0,
                               ce_weight=1.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("impl", FUSED)
def test_confident_rows_bf16(impl, block_path):
    logits, labels, old, new = make_inputs((8,), 50, torch.bfloat16, scale=40.0, n_ignored=0)
    check_case(impl, logits, labels, old, new, ce_weight=0.5, temperature=0.5)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("bad", ["student", "old", "new"])
def test_nan_propagates(impl, bad):
    logits, labels, old, new = make_inputs((4,), 16, n_ignored=0)
    target = {"student": logits, "old": old, "new": new}[bad]
    target[1, 3] = float("nan")
    loss = mf.fused_compat_loss(logits, labels, old, new, impl=impl, mask="all_old" if bad != "new"
                                else "muscle", reduction="none")
    if bad != "new":
        assert torch.isnan(loss[1])
    mean = mf.fused_compat_loss(logits, labels, old, new, impl=impl, reduction="mean",
                                mask="all_old" if bad != "new" else torch.zeros(4, device=DEVICE))
    assert torch.isnan(mean)


@pytest.mark.parametrize("impl", FUSED)
def test_out_of_range_label_without_validate_is_nan(impl):
    logits, labels, old, new = make_inputs((4,), 16, n_ignored=0)
    labels[2] = 999
    z = logits.clone().requires_grad_(True)
    loss = mf.fused_compat_loss(z, labels, old, new, impl=impl, validate=False, reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
    assert torch.isnan(z.grad[2]).all() and torch.isfinite(z.grad[[0, 1, 3]]).all()


@pytest.mark.parametrize("impl", FUSED)
def test_non_contiguous_inputs(impl, block_path):
    """Shifted slices of [B, T+1, V] (the usual causal-LM case) are read in place, and a
    non-unit vocabulary stride is copied."""
    logits, labels, old, new = make_inputs((3, 6), 26)
    z, o = logits[:, :-1], old[:, 1:]
    w = new.transpose(0, 1).contiguous().transpose(0, 1)[:, :-1]
    assert not z.is_contiguous() and not w.is_contiguous()
    check_case(impl, z, labels[:, 1:], o, w, ce_weight=0.2)
    zt = logits[0].t().contiguous().t()  # stride(-1) != 1
    check_case(impl, zt, labels[0], old[0], new[0])


@pytest.mark.parametrize("dtype,impl", matrix(
    DTYPES, FUSED, slow_if=lambda dtype, impl: impl == "triton" and dtype == torch.float16))
def test_inplace_backward(impl, dtype, block_path):
    logits, labels, old, new = make_inputs((2, 5), 37, dtype)
    ref_loss, ref_grad, _, up = run(impl, logits, labels, old, new, ce_weight=0.2)
    leaf = logits.detach().clone().requires_grad_(True)
    z = leaf * 1  # a non-leaf, as an lm_head output is
    loss = mf.fused_compat_loss(z, labels, old, new, impl=impl, ce_weight=0.2, inplace_backward=True)
    loss.backward(up)
    assert float(loss) == float(ref_loss)
    assert torch.equal(leaf.grad, ref_grad)
    assert torch.equal(z.detach(), leaf.grad)  # the logits buffer now holds the gradient


@pytest.mark.parametrize("impl", FUSED)
def test_frozen_teachers_get_no_grad_and_are_unchanged(impl):
    logits, labels, old, new = make_inputs((6,), 20)
    old_copy, new_copy = old.clone(), new.clone()
    z = logits.clone().requires_grad_(True) * 1
    mf.fused_compat_loss(z, labels, old, new, impl=impl, inplace_backward=True).backward()
    assert torch.equal(old, old_copy) and torch.equal(new, new_copy)
    assert old.grad is None and new.grad is None


@pytest.mark.parametrize("impl", FUSED)
def test_forward_without_grad_writes_no_gradient(impl):
    logits, labels, old, new = make_inputs((6,), 20)
    before = logits.clone()
    with torch.no_grad():
        loss = mf.fused_compat_loss(logits, labels, old, new, impl=impl, inplace_backward=True)
    assert torch.equal(logits, before) and loss.grad_fn is None


@pytest.mark.parametrize("impl", FUSED)
def test_backward_twice_is_an_error(impl):
    logits, labels, old, new = make_inputs((3,), 9)
    z = logits.clone().requires_grad_(True)
    loss = mf.fused_compat_loss(z, labels, old, new, impl=impl)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("impl", FUSED)
def test_module_matches_function(impl):
    logits, labels, old, new = make_inputs((5,), 12)
    module = mf.FusedCompatLoss(mask="old_correct", temperature=1.5, impl=impl)
    assert "old_correct" in repr(module)
    got = module(logits, labels, old, new)
    want = mf.fused_compat_loss(logits, labels, old, new, mask="old_correct", temperature=1.5,
                                impl=impl)
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="temprature"):
        mf.FusedCompatLoss(temprature=2.0)


def test_stats_to_dict():
    logits, labels, old, new = make_inputs((5,), 12)
    _, stats = mf.fused_compat_loss(logits, labels, old, new, impl="torch", return_stats=True)
    d = stats.to_dict("train/")
    assert set(d) == {"train/" + f for f in STAT_FIELDS} and all(isinstance(v, float) for v in d.values())


# --------------------------------------------------------------------------- gradient scaling


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_non_power_of_two_upstream_low_precision(impl, dtype):
    """The forward stores the gradient in the logits' dtype; an upstream factor other than a
    power of two then rounds it a second time in the backward (PyTorch rounds once: half a unit
    in the last place). The error stays within the two roundings' half units."""
    logits, labels, old, new = make_inputs((4, 8), 40, dtype)
    up = torch.tensor(0.7312, device=DEVICE)
    _, grad, _, _ = run(impl, logits, labels, old, new, upstream=up, ce_weight=0.3)
    z64 = logits.detach().double().requires_grad_(True)
    compat_loss_reference(z64, labels, old.double(), new.double(), ce_weight=0.3).backward(
        up.double())
    exact = z64.grad
    info = torch.finfo(dtype)

    def ulp(x):
        return info.eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(info.tiny))))

    # half a unit when the unscaled gradient is stored, scaled by `up`, plus half a unit of the
    # result; 2% of a unit for the float32 arithmetic before either rounding
    bound = 0.5 * ulp(exact / 0.7312) * 0.7312 + 0.5 * ulp(exact) + 0.02 * ulp(exact)
    assert bool(((grad.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per_row"])
def test_scale_rows_kernel(per_row):
    if not mf.available_impls(DEVICE)["triton"].available:
        pytest.skip("triton unavailable")
    g = torch.randn(2, 3, 40, device=DEVICE)
    ref = g.clone()
    go = torch.tensor([1.0, 2.0, -0.5, 1.0, 0.0, 3.0], device=DEVICE) if per_row else torch.tensor(
        0.25, device=DEVICE)
    triton_ops.scale_rows_triton(g, go)
    assert torch.equal(g, ref * (go.view(2, 3, 1) if per_row else go))
    one = torch.tensor(1.0, device=DEVICE)
    triton_ops.scale_rows_triton(g, one)
    assert torch.equal(g, ref * (go.view(2, 3, 1) if per_row else go))


@pytest.mark.parametrize("impl", FUSED)
def test_upstream_one_reuses_forward_gradient(impl):
    """With upstream 1 the gradient handed back is the forward's buffer itself, unscaled."""
    logits, labels, old, new = make_inputs((4,), 10)
    z = logits.clone().requires_grad_(True) * 1
    expected = run(impl, logits, labels, old, new, upstream=torch.tensor(1.0))[1]
    seen = []
    z.register_hook(lambda g: seen.append((g.data_ptr(), g.clone())))
    mf.fused_compat_loss(z, labels, old, new, impl=impl, inplace_backward=True).backward()
    assert seen[0][0] == z.data_ptr() and torch.equal(seen[0][1], expected)


# --------------------------------------------------------------------------- bad input


def _bad_cases():
    v = 10
    z = torch.randn(4, v)
    y = torch.randint(0, v, (4,))
    o, w = torch.randn(4, v), torch.randn(4, v)
    cases = {
        "logits-1d": ((torch.randn(v), y, o, w), {}, ValueError, "logits"),
        "logits-int": ((z.long(), y, o, w), {}, TypeError, "logits"),
        "labels-float": ((z, y.float(), o, w), {}, TypeError, "labels"),
        "labels-shape": ((z, y[:3], o, w), {}, ValueError, "labels"),
        "labels-range": ((z, torch.tensor([0, 1, 10, 2]), o, w), {}, ValueError, "labels"),
        "labels-negative": ((z, torch.tensor([0, -1, 1, 2]), o, w), {}, ValueError, "labels"),
        "old-missing": ((z, y, None, w), {}, ValueError, "old_logits"),
        "old-vocab": ((z, y, torch.randn(4, v + 1), w), {}, ValueError, "one tokenizer"),
        "new-shape": ((z, y, o, torch.randn(3, v)), {}, ValueError, "new_logits"),
        "old-dtype": ((z, y, o.long(), w), {}, TypeError, "old_logits"),
        "old-requires-grad": ((z, y, o.clone().requires_grad_(), w), {}, ValueError, "detach"),
        "mask-name": ((z, y, o, w), {"mask": "musle"}, ValueError, "mask"),
        "mask-needs-new": ((z, y, o, None), {"mask": "muscle"}, ValueError, "new_logits"),
        "mask-values": ((z, y, o, w), {"mask": torch.tensor([0, 2, 1, 0])}, ValueError, "0/1"),
        "mask-shape": ((z, y, o, w), {"mask": torch.ones(5)}, ValueError, "mask"),
        "mask-type": ((z, y, o, w), {"mask": 3}, TypeError, "mask"),
        "temperature-zero": ((z, y, o, w), {"temperature": 0.0}, ValueError, "temperature"),
        "temperature-nan": ((z, y, o, w), {"temperature": float("nan")}, ValueError, "temperature"),
        "kl-negative": ((z, y, o, w), {"kl_weight": -1.0}, ValueError, "kl_weight"),
        "weights-both-zero": ((z, y, o, w), {"kl_weight": 0.0}, ValueError, "both 0"),
        "ce-str": ((z, y, o, w), {"ce_weight": "1"}, TypeError, "ce_weight"),
        "reduction": ((z, y, o, w), {"reduction": "avg"}, ValueError, "reduction"),
        "num-items-sum": ((z, y, o, w), {"num_items": 4, "reduction": "sum"}, ValueError, "num_items"),
        "num-items-zero": ((z, y, o, w), {"num_items": 0}, ValueError, "num_items"),
        "num-items-tensor-zero": ((z, y, o, w), {"num_items": torch.tensor(0)}, ValueError,
                                  "num_items"),
        "num-items-tensor-negative": ((z, y, o, w), {"num_items": torch.tensor(-3)}, ValueError,
                                      "num_items"),
        "num-items-tensor-nan": ((z, y, o, w), {"num_items": torch.tensor(float("nan"))},
                                 ValueError, "num_items"),
        "num-items-tensor-inf": ((z, y, o, w), {"num_items": torch.tensor(float("inf"))},
                                 ValueError, "num_items"),
        "num-items-tensor-bool": ((z, y, o, w), {"num_items": torch.tensor(True)}, TypeError,
                                  "num_items"),
        "num-items-two-values": ((z, y, o, w), {"num_items": torch.tensor([2, 3])}, ValueError,
                                 "num_items"),
        "return-stats-str": ((z, y, o, w), {"return_stats": "yes"}, TypeError, "return_stats"),
        "validate-int": ((z, y, o, w), {"validate": 1}, TypeError, "validate"),
        "inplace-str": ((z, y, o, w), {"inplace_backward": "no"}, TypeError, "inplace_backward"),
        "seq-ids-wrong-mask": ((z, y, o, w), {"sequence_ids": torch.zeros(4, dtype=torch.long)},
                               ValueError, "sequence_ids"),
        "impl-name": ((z, y, o, w), {"impl": "cuda"}, ValueError, "impl"),
        "ignore-float": ((z, y, o, w), {"ignore_index": -100.0}, TypeError, "ignore_index"),
        "impl-fp64": ((z.double(), y, o.double(), w.double()), {"impl": "triton"}, TypeError,
                      "float64"),
    }
    return [pytest.param(*c, id=k) for k, c in cases.items()]


@pytest.mark.parametrize("args,kwargs,exc,match", _bad_cases())
def test_bad_input_raises(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mf.fused_compat_loss(*args, **kwargs)


@pytest.mark.parametrize("options,exc,match", [
    pytest.param({"temperature": -1}, ValueError, "temperature", id="temperature"),
    pytest.param({"mask": "musle"}, ValueError, "mask", id="mask-name"),
    pytest.param({"mask": 3}, TypeError, "mask", id="mask-type"),
    pytest.param({"kl_weight": 0.0}, ValueError, "both 0", id="weights-both-zero"),
    pytest.param({"ce_weight": "1"}, TypeError, "ce_weight", id="ce-str"),
    pytest.param({"reduction": "avg"}, ValueError, "reduction", id="reduction"),
    pytest.param({"ignore_index": -100.0}, TypeError, "ignore_index", id="ignore-float"),
    pytest.param({"inplace_backward": "no"}, TypeError, "inplace_backward", id="inplace-str"),
    pytest.param({"impl": "cuda"}, ValueError, "impl", id="impl-name"),
])
def test_module_checks_options_when_constructed(options, exc, match):
    """FusedCompatLoss refuses a bad option where it is made, with the loss's own message."""
    logits, labels, old, new = make_inputs((4,), 10)
    with pytest.raises(exc, match=match) as at_call:
        mf.fused_compat_loss(logits, labels, old, new, **options)
    with pytest.raises(exc, match=match) as made:
        mf.FusedCompatLoss(**options)
    assert str(made.value) == str(at_call.value)


def test_dtype_messages_name_every_accepted_dtype():
    """float64 logits and int32 labels are accepted (and computed right): the messages say so."""
    logits, labels, old, new = make_inputs((6,), 20)
    with pytest.raises(TypeError, match=r"logits must be float32, bfloat16, float16 or float64"):
        mf.fused_compat_loss(logits.long(), labels, old, new)
    with pytest.raises(TypeError, match=r"old_logits must be float32, bfloat16, float16 or float64"):
        mf.fused_compat_loss(logits, labels, old.long(), new)
    with pytest.raises(TypeError, match=r"labels must hold integer ids \(any integer dtype"):
        mf.fused_compat_loss(logits, labels.float(), old, new)
    got = mf.fused_compat_loss(logits.double(), labels.int(), old.double(), new.double())
    want = compat_loss_reference(logits.double(), labels, old.double(), new.double())
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=0)
    for impl in FUSED:
        got = mf.fused_compat_loss(logits, labels.int(), old, new, impl=impl)
        assert torch.equal(got, mf.fused_compat_loss(logits, labels, old, new, impl=impl))


def _overlapping_logits(vocab):
    """Student logits [8, vocab] whose elements share memory (issue 23 item 1)."""
    p = torch.randn(vocab, device=DEVICE, requires_grad=True)
    base = torch.randn(8 + vocab, device=DEVICE, requires_grad=True) * 1
    return {
        "expanded-rows": (p * 1).expand(8, vocab),  # stride 0 on the rows
        "overlapping-rows": base.as_strided((8, vocab), (1, 1)),  # row i starts at element i
        "expanded-vocab": (p[:8] * 1).unsqueeze(1).expand(8, vocab),  # stride 0 on the vocabulary
    }


@pytest.mark.parametrize("impl", FUSED + ["torch"])
@pytest.mark.parametrize("kind", ["expanded-rows", "overlapping-rows", "expanded-vocab"])
def test_inplace_backward_refuses_overlapping_logits(impl, kind):
    """The gradient of one element would overwrite another's logit: refused, as PyTorch's in-place
    ops refuse such a tensor, on every backend (one check); without the flag it computes."""
    vocab = 11
    z = _overlapping_logits(vocab)[kind]
    y = torch.randint(0, vocab, (8,), device=DEVICE)
    o, w = torch.randn(8, vocab, device=DEVICE), torch.randn(8, vocab, device=DEVICE)
    with pytest.raises(ValueError, match=r"inplace_backward.*logits.*share memory"):
        mf.fused_compat_loss(z, y, o, w, impl=impl, inplace_backward=True)
    loss = mf.fused_compat_loss(z, y, o, w, impl=impl).detach()
    want = compat_loss_reference(z.detach().double(), y, o.double(), w.double())
    assert abs(float(loss) - float(want)) < 1e-4
    with torch.no_grad():  # nothing is written without a gradient: accepted
        mf.fused_compat_loss(z, y, o, w, impl=impl, inplace_backward=True)


@pytest.mark.parametrize("impl", FUSED + ["torch"])
@pytest.mark.parametrize("view", [False, True], ids=["leaf", "view-of-leaf"])
def test_inplace_backward_refuses_a_leaf_that_requires_grad(impl, view):
    """An nn.Parameter (or a view of one) would be overwritten with its gradient: refused on every
    backend, as PyTorch refuses an in-place op on such a leaf."""
    logits, labels, old, new = make_inputs((6,), 20)
    param = torch.nn.Parameter(logits.clone())
    z = param[:, :] if view else param
    with pytest.raises(ValueError, match=r"inplace_backward.*logits.*leaf.*requires grad"):
        mf.fused_compat_loss(z, labels, old, new, impl=impl, inplace_backward=True)
    assert torch.equal(param.detach(), logits)


@pytest.mark.gpu
@pytest.mark.parametrize("count", [0, -3, float("nan")], ids=["zero", "negative", "nan"])
def test_bad_device_num_items_gives_nan_or_raises(count):
    """A count on the GPU is not read without validate (a sync): NaN, never a finite number."""
    logits, labels, old, new = make_inputs((6,), 11)
    z = logits.clone().requires_grad_(True)
    n = torch.tensor(count, device=DEVICE)
    loss = mf.fused_compat_loss(z, labels, old, new, num_items=n, validate=False)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(z.grad).all()
    with pytest.raises(ValueError, match="num_items"):
        mf.fused_compat_loss(logits, labels, old, new, num_items=n)


def test_cpu_num_items_tensor_divides():
    logits, labels, old, new = make_inputs((6,), 11)
    a = mf.fused_compat_loss(logits, labels, old, new, num_items=torch.tensor(7), impl="torch")
    b = mf.fused_compat_loss(logits, labels, old, new, reduction="sum", impl="torch") / 7
    assert torch.allclose(a, b)


@pytest.mark.gpu
def test_device_mismatch_raises():
    z = torch.randn(4, 10, device="cuda")
    with pytest.raises(ValueError, match="old_logits"):
        mf.fused_compat_loss(z, torch.zeros(4, dtype=torch.long, device="cuda"), torch.randn(4, 10),
                             torch.randn(4, 10, device="cuda"))


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("impl", FUSED)
def test_torch_compile_fullgraph(impl):
    torch._dynamo.reset()
    logits, labels, old, new = make_inputs((2, 4), 24)

    def step(z, y, o, w):
        loss, stats = mf.fused_compat_loss(z, y, o, w, impl=impl, ce_weight=0.1, return_stats=True)
        return loss * 2.0, stats.frac_to_old

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.clone().requires_grad_(True)
    eager_loss, eager_frac = step(z1, labels, old, new)
    with warnings.catch_warnings():
        # tracing our code warns about nothing (issue 23 item 10: Dynamo's lru_cache warning).
        # Not ours: torch's DeprecationWarning when Dynamo instantiates any autograd.Function
        # (hidden by Python's default filters), the CPU Triton interpreter's NumPy on masked lanes.
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
        comp_loss, comp_frac = compiled(z2, labels, old, new)
    eager_loss.backward()
    comp_loss.backward()
    assert torch.allclose(eager_loss, comp_loss) and torch.equal(eager_frac, comp_frac)
    assert torch.allclose(z1.grad, z2.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", FUSED)
def test_no_host_sync_in_forward_backward(impl):
    logits, labels, old, new = make_inputs((64,), 32000, torch.bfloat16)
    z = logits.clone().requires_grad_(True)
    # made before the check: creating a CUDA tensor from a Python number is itself a sync
    # (pytorch/pytorch#120996), so it must not happen inside it
    upstream = torch.tensor(0.5, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = mf.fused_compat_loss(z, labels, old, new, impl=impl, validate=False)
        loss.backward(upstream)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_triton_launches_on_the_inputs_device():
    """Inputs on cuda:1 while cuda:0 is current: every kernel runs where its tensors are."""
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    logits, labels, old, new = (t.to(dev) for t in make_inputs((3, 5), 300))
    check_case("triton", logits, labels, old, new, mask="muscle", ce_weight=0.25)
    check_case("triton", logits, labels, old, new, mask="sequence_likelihood")
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
@pytest.mark.slow
def test_64bit_offsets():
    """N * V above 2**31 elements."""
    n, v = 17000, 128256  # 2.18e9 elements, bf16: 4.4 GB per tensor
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    old = logits.clone()
    labels = torch.randint(0, v, (n,), device="cuda")
    loss, stats = mf.fused_compat_loss(logits, labels, old, None, mask="all_old", impl="triton",
                                       return_stats=True)
    assert abs(float(loss)) < 1e-3 and float(stats.n_valid) == n
    last = mf.fused_compat_loss(logits[-2:], labels[-2:], old[-2:], None, mask="all_old",
                                impl="torch", reduction="none")
    full = mf.fused_compat_loss(logits, labels, old, None, mask="all_old", impl="triton",
                                reduction="none")
    assert torch.allclose(full[-2:], last, atol=1e-4)
