"""The reference itself, checked against PyTorch's own losses and autograd (docs/SPEC.md section 2).

Every backend is judged against ``compat_loss_reference`` in float64, so the reference is checked
here against what it must equal: ``F.kl_div`` and ``F.cross_entropy`` on the cases they can
express, the closed-form gradient of docs/SPEC.md, and ``torch.autograd.gradcheck``.
"""
import pytest
import torch
import torch.nn.functional as F

from muscle_fast.ops.compat_loss.reference import compat_loss_reference

T = 2.0


def _inputs(n=12, v=17, seed=0, ignored=(3, 7)):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    o = z + torch.randn(n, v, generator=g, dtype=torch.float64)
    w = z + 0.5 * torch.randn(n, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    y[: n // 3] = z[: n // 3].argmax(-1)  # some tokens the student gets right
    for i in ignored:
        y[i] = -100
    return z, y, o, w


def _kl(teacher, student, t=T):
    """KL(p_teacher || p_student) per row at temperature t, by F.kl_div."""
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                    log_target=True, reduction="none").sum(-1)


def test_all_old_is_kl_div_per_token():
    z, y, o, _ = _inputs()
    got = compat_loss_reference(z, y, o, mask="all_old", temperature=T, reduction="none")
    valid = y != -100
    assert torch.allclose(got[valid], _kl(o, z)[valid], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))


def test_mean_over_valid_tokens_is_kl_div_mean():
    z, y, o, _ = _inputs()
    valid = y != -100
    got = compat_loss_reference(z, y, o, mask="all_old", temperature=T)
    assert torch.allclose(got, _kl(o, z)[valid].mean(), rtol=1e-12)


def test_muscle_mask_picks_old_where_the_student_is_wrong():
    z, y, o, w = _inputs()
    got = compat_loss_reference(z, y, o, w, mask="muscle", temperature=T, reduction="none")
    wrong = z.argmax(-1) != y
    want = torch.where(wrong, _kl(o, z), _kl(w, z))
    valid = y != -100
    assert wrong[valid].any() and (~wrong[valid]).any()  # both branches are exercised
    assert torch.allclose(got[valid], want[valid], rtol=1e-12, atol=1e-12)


def test_old_correct_and_given_mask():
    z, y, o, w = _inputs()
    valid = y != -100
    got = compat_loss_reference(z, y, o, w, mask="old_correct", temperature=T, reduction="none")
    want = torch.where(o.argmax(-1) == y, _kl(o, z), _kl(w, z))
    assert torch.allclose(got[valid], want[valid], rtol=1e-12, atol=1e-12)
    m = torch.rand(y.shape) < 0.5
    got = compat_loss_reference(z, y, o, w, mask=m, temperature=T, reduction="none")
    assert torch.allclose(got[valid], torch.where(m, _kl(o, z), _kl(w, z))[valid], rtol=1e-12)
    # without a new teacher the unselected tokens contribute 0
    got = compat_loss_reference(z, y, o, None, mask=m, temperature=T, reduction="none")
    assert torch.allclose(got[valid], torch.where(m, _kl(o, z), torch.zeros(()))[valid])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_term_is_cross_entropy(reduction):
    z, y, o, _ = _inputs()
    got = compat_loss_reference(z, y, o, mask="all_old", kl_weight=0.0, ce_weight=1.0,
                                reduction=reduction)
    want = F.cross_entropy(z, y, ignore_index=-100, reduction=reduction)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_mixed_weights_add_up():
    z, y, o, w = _inputs()
    lam = 0.3
    got = compat_loss_reference(z, y, o, w, mask="muscle", kl_weight=lam, ce_weight=1 - lam)
    kl = compat_loss_reference(z, y, o, w, mask="muscle")
    ce = F.cross_entropy(z, y, ignore_index=-100)
    assert torch.allclose(got, lam * kl + (1 - lam) * ce, rtol=1e-12)


def test_num_items_and_all_ignored():
    z, y, o, _ = _inputs()
    s = compat_loss_reference(z, y, o, mask="all_old", reduction="sum")
    assert torch.allclose(compat_loss_reference(z, y, o, mask="all_old", num_items=40), s / 40)
    zz = z.clone().requires_grad_(True)
    loss = compat_loss_reference(zz, torch.full_like(y, -100), o, mask="all_old")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(zz.grad, torch.zeros_like(zz))


@pytest.mark.parametrize("mask", ["muscle", "old_correct", "all_old"])
def test_gradient_is_the_closed_form(mask):
    """d loss_i / d z = kl_w (softmax(z/T) - p_t) / T + ce_w (softmax(z) - onehot(y))."""
    z, y, o, w = _inputs()
    kw, cw = 0.7, 0.4
    zz = z.clone().requires_grad_(True)
    compat_loss_reference(zz, y, o, w, mask=mask, temperature=T, kl_weight=kw, ce_weight=cw,
                          reduction="sum").backward()
    to_old = {"muscle": z.argmax(-1) != y, "old_correct": o.argmax(-1) == y,
              "all_old": torch.ones_like(y, dtype=torch.bool)}[mask]
    p_t = torch.where(to_old[:, None], F.softmax(o / T, -1), F.softmax(w / T, -1))
    valid = (y != -100)[:, None]
    onehot = F.one_hot(y.clamp(min=0), z.shape[1]).double()
    want = kw * (F.softmax(z / T, -1) - p_t) / T + cw * (F.softmax(z, -1) - onehot)
    want = torch.where(valid, want, torch.zeros_like(want))
    assert torch.allclose(zz.grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask,temperature,ce_weight,reduction", [
    pytest.param("muscle", 2.0, 0.0, "mean", id="muscle-T2"),
    pytest.param("old_correct", 1.0, 0.5, "sum", id="old_correct-ce"),
    pytest.param("token_likelihood", 0.7, 0.2, "mean", id="token_likelihood"),
    pytest.param("sequence_likelihood", 3.0, 0.0, "none", id="sequence_likelihood"),
    pytest.param("all_old", 2.0, 1.0, "none", id="all_old-none"),
])
def test_gradcheck_float64(mask, temperature, ce_weight, reduction):
    z, y, o, w = _inputs(n=6, v=7, ignored=(2,))
    lead_y = y.view(2, 3)

    def f(x):
        return compat_loss_reference(x.view(2, 3, -1), lead_y, o.view(2, 3, -1), w.view(2, 3, -1),
                                     mask=mask, temperature=temperature, ce_weight=ce_weight,
                                     reduction=reduction)

    assert torch.autograd.gradcheck(f, (z.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)


def test_stats_are_the_plain_rates():
    z, y, o, w = _inputs()
    valid = y != -100
    _, st = compat_loss_reference(z, y, o, w, mask="muscle", return_stats=True)
    assert st.n_valid.item() == valid.sum().item()
    assert torch.allclose(st.acc_student, (z.argmax(-1) == y)[valid].double().mean())
    assert torch.allclose(st.acc_old, (o.argmax(-1) == y)[valid].double().mean())
    assert torch.allclose(st.frac_to_old, (z.argmax(-1) != y)[valid].double().mean())
    assert torch.allclose(st.kl_old, _kl(o, z)[valid].mean())
    assert torch.allclose(st.ce, F.cross_entropy(z, y, ignore_index=-100))
