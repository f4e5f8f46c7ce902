"""Native CPU backend (csrc/, muscle_fast._native): the row contract against the float64
reference, the binding's own argument checks, threads, the GIL, in-place gradients, the exp and
the dtype conversions, and (slow) the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_pass_rule
from muscle_fast.ops.compat_loss import native
from muscle_fast.ops.compat_loss.contract import MaskMode, Stat
from muscle_fast.ops.compat_loss.reference import compat_loss_reference

ok, why = native.native_available()
pytestmark = pytest.mark.skipif(not ok, reason=why)
_native = native._native

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
MODE_NAMES = {m: m.name.lower() for m in MaskMode if m != MaskMode.GIVEN}
ISAS = _native.available_isas() if ok else []


# ---------------------------------------------------------------- helpers


def run_native(
    z,
    y,
    o,
    w,
    mask,
    grad,
    scale,
    *,
    mode,
    temperature=2.0,
    kl_weight=1.0,
    ce_weight=0.0,
    ignore_index=-100,
    old_label_logprob=False,
):
    return native.compat_loss_native(
        z,
        y,
        o,
        w,
        mask,
        grad,
        torch.tensor(scale, dtype=torch.float32),
        mask_mode=mode,
        inv_temperature=1.0 / temperature,
        kl_weight=kl_weight,
        ce_weight=ce_weight,
        ignore_index=ignore_index,
        old_label_logprob=old_label_logprob,
    )


def row_stats_expected(
    z,
    y,
    o,
    w,
    mask,
    *,
    mode,
    temperature,
    kl_weight,
    ce_weight,
    ignore_index,
    need_old_logp,
    compute,
):
    """The row-stat columns (contract.Stat), from the reference's formulas, computed in `compute` dtype."""
    V = z.shape[-1]
    z = z.reshape(-1, V).to(compute)
    o = None if o is None else o.reshape(-1, V).to(compute)
    w = None if w is None else w.reshape(-1, V).to(compute)
    valid = y != ignore_index
    yi = torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)
    t = temperature

    def kl(teacher):
        lt, ls = F.log_softmax(teacher / t, -1), F.log_softmax(z / t, -1)
        p = lt.exp()
        return torch.where(p == 0, torch.zeros_like(p), p * (lt - ls)).sum(-1)

    zero = torch.zeros(z.shape[0], dtype=compute)
    s_logp = F.log_softmax(z, -1).gather(1, yi).squeeze(1)
    o_logp = zero if o is None else F.log_softmax(o, -1).gather(1, yi).squeeze(1)
    kl_old = zero if o is None else kl(o)
    kl_new = zero if w is None else kl(w)
    hit_s = z.argmax(-1) == y
    hit_o = torch.zeros_like(hit_s) if o is None else o.argmax(-1) == y
    hit_w = torch.zeros_like(hit_s) if w is None else w.argmax(-1) == y
    m = {
        MaskMode.GIVEN: lambda: mask.bool() if mask is not None else None,
        MaskMode.MUSCLE: lambda: ~hit_s,
        MaskMode.OLD_CORRECT: lambda: hit_o,
        MaskMode.TOKEN_LIKELIHOOD: lambda: s_logp < o_logp,
        MaskMode.ALL_OLD: lambda: torch.ones_like(hit_s),
    }[MaskMode(mode)]()
    named = {
        Stat.LOSS: zero,
        Stat.TO_OLD: m.to(compute),
        Stat.HIT_STUDENT: hit_s.to(compute),
        Stat.HIT_OLD: hit_o.to(compute),
        Stat.HIT_NEW: hit_w.to(compute),
        Stat.KL_OLD: kl_old,
        Stat.KL_NEW: kl_new,
        Stat.CE: -s_logp,
        Stat.OLD_LOGP: o_logp if need_old_logp else zero,
    }
    cols = [named[c] for c in Stat]
    out = torch.stack(cols, 1)
    return torch.where(valid.unsqueeze(1), out, torch.zeros_like(out))


def reference_loss_and_grad(z, y, o, w, mask, scale, *, compute, mode, **kw):
    """Per-row loss and scale * d(sum loss)/dz from compat_loss_reference, in `compute`
    (float64) or in the input dtype upcast to float32 (torch's same-dtype result)."""
    x = z.detach().to(compute) if compute == torch.float64 else z.detach().clone()
    x.requires_grad_(True)
    cast = (
        (lambda t: None if t is None else t.to(compute))
        if compute == torch.float64
        else (lambda t: t)
    )
    m = MODE_NAMES[MaskMode(mode)] if mode != MaskMode.GIVEN else mask.bool()
    loss = compat_loss_reference(x, y, cast(o), cast(w), mask=m, reduction="none", **kw)
    if loss.requires_grad:
        (loss.sum() * scale).backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return loss.detach().reshape(-1), grad.detach()


def make_inputs(B, T, V, dtype, *, seed, ignore=True, neg_inf=False, noncontig=False):
    g = torch.Generator().manual_seed(seed)

    def logits():
        full = torch.randn(B, T + (1 if noncontig else 0), V, generator=g) * 3
        return full

    z, o, w = logits(), logits(), logits()
    if neg_inf and V > 3:
        cols = torch.randperm(V, generator=g)[: max(1, V // 5)]
        for x in (z, o, w):
            x[..., cols] = float("-inf")
        o[..., torch.randperm(V, generator=g)[:2]] = float("-inf")  # teacher-only masked entries
        allowed = torch.ones(V, dtype=torch.bool)
        allowed[cols] = False
        choices = allowed.nonzero().squeeze(1)
        y = choices[torch.randint(0, choices.numel(), (B * T,), generator=g)]
    else:
        y = torch.randint(0, V, (B * T,), generator=g)
    # make a third of the rows "correct" for the student and the old model
    hit = torch.rand(B * T, generator=g) < 0.33
    z2, o2 = z[:, :T].reshape(-1, V), o[:, :T].reshape(-1, V)
    y = torch.where(hit, z2.argmax(-1), y)
    y = torch.where(torch.rand(B * T, generator=g) < 0.3, o2.argmax(-1), y)
    if ignore:
        y[torch.rand(B * T, generator=g) < 0.2] = -100
    z, o, w = (x.to(dtype) for x in (z, o, w))
    if noncontig:
        z, o, w = z[:, :-1, :], o[:, 1:, :], w[:, :-1, :]
        assert not z.is_contiguous()
    mask = (torch.rand(B * T, generator=g) < 0.5).float()
    return z, y, o, w, mask


CASES = [
    pytest.param(2, 5, 7, {}, id="V7"),
    pytest.param(3, 2, 1, {"ignore": False}, id="V1"),
    pytest.param(2, 9, 1271, {"neg_inf": True}, id="V1271-neginf"),
    pytest.param(2, 4, 1271, {"noncontig": True}, id="V1271-slice"),
    pytest.param(2, 3, 3000, {"neg_inf": True, "noncontig": True}, id="V3000-slice-neginf"),
]


def check_case(
    B,
    T,
    V,
    dtype,
    opts,
    *,
    mode,
    temperature,
    kl_weight,
    ce_weight,
    with_new=True,
    seed=0,
    old_label_logprob=False,
):
    z, y, o, w, mask = make_inputs(B, T, V, dtype, seed=seed, **opts)
    if not with_new:
        w = None
    scale = 0.37
    grad = torch.full(z.shape, float("nan"), dtype=dtype)
    stats = run_native(
        z,
        y,
        o,
        w,
        mask if mode == MaskMode.GIVEN else None,
        grad,
        scale,
        mode=mode,
        temperature=temperature,
        kl_weight=kl_weight,
        ce_weight=ce_weight,
        old_label_logprob=old_label_logprob,
    )
    kw = dict(temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight)
    l64, g64 = reference_loss_and_grad(
        z, y, o, w, mask, scale, compute=torch.float64, mode=mode, **kw
    )
    l32, g32 = reference_loss_and_grad(z, y, o, w, mask, scale, compute=None, mode=mode, **kw)
    assert_pass_rule(stats[:, Stat.LOSS], l32, l64, dtype, "loss")
    assert_pass_rule(grad.reshape(-1, V), g32.reshape(-1, V), g64.reshape(-1, V), dtype, "grad")
    need_logp = mode == MaskMode.TOKEN_LIKELIHOOD or old_label_logprob
    skw = dict(
        mode=mode,
        temperature=temperature,
        kl_weight=kl_weight,
        ce_weight=ce_weight,
        ignore_index=-100,
        need_old_logp=need_logp,
    )
    e64 = row_stats_expected(z, y, o, w, mask, compute=torch.float64, **skw)
    e32 = row_stats_expected(z, y, o, w, mask, compute=torch.float32, **skw)
    exact = [Stat.TO_OLD, Stat.HIT_STUDENT, Stat.HIT_OLD, Stat.HIT_NEW]
    assert torch.equal(stats[:, exact].double(), e64[:, exact]), "mask / hit columns differ"
    for c in (Stat.KL_OLD, Stat.KL_NEW, Stat.CE, Stat.OLD_LOGP):
        assert_pass_rule(stats[:, c], e32[:, c], e64[:, c], dtype, c.name.lower())
    return stats, grad


# ---------------------------------------------------------------- the row contract vs float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,V,opts", CASES)
@pytest.mark.parametrize(
    "mode", list(MaskMode), ids=[m.name.lower() for m in MaskMode]
)
def test_matches_reference(B, T, V, opts, dtype, mode):
    check_case(B, T, V, dtype, opts, mode=mode, temperature=2.0, kl_weight=1.0, ce_weight=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "temperature,kl_weight,ce_weight,with_new,old_lp",
    [
        pytest.param(1.0, 1.0, 0.0, True, True, id="T1"),
        pytest.param(0.7, 0.6, 0.4, True, True, id="T0.7-mixed"),
        pytest.param(2.0, 0.5, 0.5, True, False, id="T2-mixed"),
        pytest.param(3.0, 0.0, 1.0, True, False, id="ce-only"),
        pytest.param(2.0, 1.0, 0.0, False, False, id="no-new"),
        pytest.param(2.0, 0.0, 0.0, True, False, id="zero-weights"),
    ],
)
def test_options(dtype, temperature, kl_weight, ce_weight, with_new, old_lp):
    for mode in (1, 2):
        check_case(
            2,
            6,
            1271,
            dtype,
            {"neg_inf": True},
            mode=mode,
            temperature=temperature,
            kl_weight=kl_weight,
            ce_weight=ce_weight,
            with_new=with_new,
            old_label_logprob=old_lp,
        )


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_matches(isa, monkeypatch):
    monkeypatch.setattr(native, "ISA", isa)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_case(
            2,
            3,
            2100,
            dtype,
            {"neg_inf": True},
            mode=MaskMode.MUSCLE,
            temperature=0.7,
            kl_weight=0.7,
            ce_weight=0.3,
            old_label_logprob=True,
        )


def test_all_ignored_and_argmax_ties():
    V = 2500
    z = torch.zeros(1, 3, V)
    z[0, 0, [5, 1100, 2400]] = 4.0  # ties across chunks: the first index wins
    z[0, 1, :] = float("-inf")
    z[0, 1, [2047, 2048]] = 1.0
    y = torch.tensor([5, 2047, 0])
    stats = run_native(z, y, z.clone(), None, None, None, 1.0, mode=MaskMode.OLD_CORRECT)
    assert stats[:, Stat.HIT_STUDENT].tolist() == [1.0, 1.0, 1.0]  # row 2: all zeros, argmax 0
    assert stats[:, Stat.HIT_OLD].tolist() == [1.0, 1.0, 1.0]
    assert torch.all(stats[:, Stat.KL_OLD].abs() < 1e-6)
    g = torch.full_like(z, 7.0)
    stats = run_native(z, torch.full((3,), -100), z, z, None, g, 1.0, mode=MaskMode.MUSCLE)
    assert torch.all(stats == 0) and torch.all(g == 0)


def test_label_at_neg_inf_column_pure_kl():
    z = torch.randn(1, 2, 50)
    z[..., 3] = float("-inf")
    o = z.clone() + 0.1 * torch.randn(1, 2, 50)
    y = torch.tensor([3, 4])
    g = torch.empty_like(z)
    stats = run_native(z, y, o, None, None, g, 1.0, mode=MaskMode.ALL_OLD, ce_weight=0.0)
    assert torch.isfinite(stats[:, Stat.LOSS]).all() and torch.isinf(stats[0, Stat.CE])
    assert torch.isfinite(g).all()


def test_bad_label_and_nan_inputs_give_nan():
    z = torch.randn(1, 4, 30)
    o, w = torch.randn_like(z), torch.randn_like(z)
    y = torch.tensor([30, -5, 2, 3])  # 30 and -5 are out of range (validate=False path)
    z[0, 2, 7] = float("nan")
    z[0, 3, 9] = float("inf")
    g = torch.zeros_like(z)
    stats = run_native(z, y, o, w, None, g, 1.0, mode=MaskMode.ALL_OLD, ce_weight=0.5)
    assert torch.isnan(stats[:, Stat.LOSS]).all()
    assert torch.isnan(stats[:2, 7]).all()
    assert torch.isnan(g).all()


# ---------------------------------------------------------------- in-place gradient, threads, GIL


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_gradient(dtype):
    z, y, o, w, _ = make_inputs(2, 5, 2100, dtype, seed=3, noncontig=True)
    g = torch.empty_like(z)
    s1 = run_native(z, y, o, w, None, g, 0.5, mode=MaskMode.MUSCLE, ce_weight=0.3)
    zz = z.clone()
    s2 = run_native(zz, y, o, w, None, zz, 0.5, mode=MaskMode.MUSCLE, ce_weight=0.3)
    assert torch.equal(s1, s2)
    assert torch.equal(zz, g)


def test_thread_count_follows_torch():
    z, y, o, w, _ = make_inputs(4, 16, 300, torch.float32, seed=4)
    args = [z, y, o, w, None, torch.empty_like(z), 1.0]
    before = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            used = _native.compat_loss_rows(
                **_binding_kwargs(z, y, o, w, num_threads=torch.get_num_threads())
            )
            assert used == n
            results[n] = run_native(*args, mode=MaskMode.MUSCLE)
        assert torch.equal(results[1], results[2])  # each row is one thread's: bitwise equal
    finally:
        torch.set_num_threads(before)


def test_gil_released_during_kernel():
    z, y, o, w, _ = make_inputs(64, 8, 8000, torch.float32, seed=5, ignore=False)
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    # A long switch interval: the main thread keeps the GIL between reading c0 and c1 unless the
    # extension releases it, so a kernel that held the GIL would leave c1 == c0 exactly.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.5)
    th = threading.Thread(target=spin)
    th.start()
    try:
        kw = _binding_kwargs(z, y, o, w, num_threads=1)
        _native.compat_loss_rows(**kw)  # warm; also lets the spinner start
        c0 = count[0]
        _native.compat_loss_rows(**kw)
        c1 = count[0]
    finally:
        stop.set()
        th.join()
        sys.setswitchinterval(interval)
    assert c1 > c0


# ---------------------------------------------------------------- the binding's own checks


def _binding_kwargs(z, y, o, w, **over):
    stats = torch.empty(z.shape[0] * z.shape[1], 9)
    _binding_kwargs.keep = stats
    kw = dict(
        B=z.shape[0],
        T=z.shape[1],
        V=z.shape[2],
        logits=z.data_ptr(),
        logits_dtype=0,
        logits_strides=tuple(z.stride()),
        labels=y.data_ptr(),
        old_logits=o.data_ptr(),
        old_dtype=0,
        old_strides=tuple(o.stride()),
        new_logits=w.data_ptr(),
        new_dtype=0,
        new_strides=tuple(w.stride()),
        mask=0,
        grad=0,
        grad_dtype=0,
        grad_strides=(0, 0, 1),
        row_stats=stats.data_ptr(),
        scale=1.0,
        mask_mode=1,
        inv_temperature=0.5,
        kl_weight=1.0,
        ce_weight=0.0,
        ignore_index=-100,
        old_label_logprob=False,
        num_threads=1,
    )
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "override,message",
    [
        pytest.param({"logits": 0}, "logits pointer is null", id="null-logits"),
        pytest.param({"labels": 0}, "labels pointer is null", id="null-labels"),
        pytest.param({"row_stats": 0}, "row_stats pointer is null", id="null-stats"),
        pytest.param({"old_logits": 0, "mask_mode": 4}, "needs old_logits", id="null-old"),
        pytest.param(
            {"old_logits": 0, "old_label_logprob": True}, "needs old_logits", id="null-old-logp"
        ),
        pytest.param({"mask_mode": 0}, "needs a mask pointer", id="null-mask"),
        pytest.param({"B": 0}, "must be positive", id="B0"),
        pytest.param({"T": -1}, "must be positive", id="T-neg"),
        pytest.param({"V": 0}, "must be positive", id="V0"),
        pytest.param({"logits_dtype": 3}, "logits dtype code", id="dtype-logits"),
        pytest.param({"old_dtype": -1}, "old_logits dtype code", id="dtype-old"),
        pytest.param({"new_dtype": 9}, "new_logits dtype code", id="dtype-new"),
        pytest.param(
            {"logits_strides": (10, 5, 2)}, "logits: stride of the last dim", id="stride-logits"
        ),
        pytest.param(
            {"old_strides": (10, 5, 0)}, "old_logits: stride of the last dim", id="stride-old"
        ),
        pytest.param({"grad": 1234, "grad_dtype": 1}, "grad dtype code", id="grad-dtype"),
        pytest.param({"grad": 1234, "grad_strides": (1, 1, 3)}, "grad: stride", id="grad-stride"),
        pytest.param({"mask_mode": 5}, "mask_mode must be in 0..4", id="mask-mode"),
        pytest.param({"inv_temperature": 0.0}, "inv_temperature", id="temperature"),
        pytest.param({"inv_temperature": float("inf")}, "inv_temperature", id="temperature-inf"),
        pytest.param({"num_threads": 0}, "num_threads", id="threads"),
        pytest.param({"isa": "sse9"}, "not available", id="isa"),
    ],
)
def test_binding_rejects_bad_arguments(override, message):
    z, y, o, w, _ = make_inputs(2, 3, 11, torch.float32, seed=6)
    with pytest.raises(ValueError, match=message):
        _native.compat_loss_rows(**_binding_kwargs(z, y, o, w, **override))


def test_binding_rejects_wrong_types():
    z, y, o, w, _ = make_inputs(2, 3, 11, torch.float32, seed=6)
    with pytest.raises(TypeError):
        _native.compat_loss_rows(**_binding_kwargs(z, y, o, w, logits_strides=(1, 2)))
    with pytest.raises(TypeError):
        _native.compat_loss_rows(**_binding_kwargs(z, y, o, w, logits=-1))


# ---------------------------------------------------------------- exp and conversions


@pytest.mark.parametrize("isa", ISAS)
def test_exp_ulp(isa):
    x = torch.cat(
        [
            torch.linspace(-87.0, 0.0, 2_000_001),
            torch.linspace(0.0, 88.0, 100_001),
            torch.tensor([float("-inf"), -1e30, -100.0, float("nan")]),
        ]
    )
    out = torch.empty_like(x)
    _native._exp(x.data_ptr(), out.data_ptr(), x.numel(), isa)
    ref = torch.exp(x.double())
    body = slice(0, x.numel() - 4)
    ulp = (
        torch.nextafter(ref[body].float(), torch.tensor(float("inf"))) - ref[body].float()
    ).double()
    err_ulp = ((out[body].double() - ref[body]).abs() / ulp).max().item()
    assert err_ulp <= 2.0, err_ulp
    assert out[-4].item() == 0.0 and out[-3].item() == 0.0 and out[-2].item() == 0.0
    assert torch.isnan(out[-1])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dst", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_conversion_round_trip(isa, dst):
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2**31), 2**31 - 1, (2_000_000,), generator=g, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    special = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            float("-inf"),
            float("nan"),
            65504.0,
            65519.0,
            65520.0,
            6e-8,
            2.98e-8,
            2.99e-8,
            6.1e-5,
            1e-45,
            3.4e38,
            -3.4e38,
        ]
    )
    x = torch.cat(
        [
            x,
            special,
            torch.randn(1_000_000, generator=g) * 10,
            torch.randn(100_000, generator=g) * 1e-6,
        ]
    )
    code = native.DTYPE_CODES[dst]
    out = torch.empty(x.numel(), dtype=dst)
    _native._convert(x.data_ptr(), 0, out.data_ptr(), code, x.numel(), isa)
    expect = x.to(dst)
    nan = torch.isnan(expect)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), expect[~nan].view(torch.int16))
    back = torch.empty(x.numel(), dtype=torch.float32)
    _native._convert(out.data_ptr(), code, back.data_ptr(), 0, x.numel(), isa)
    assert torch.equal(torch.isnan(back), nan)
    assert torch.equal(back[~nan], out[~nan].float())
    # every 16-bit pattern up-converts exactly
    allbits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dst)
    up = torch.empty(allbits.numel(), dtype=torch.float32)
    _native._convert(allbits.data_ptr(), code, up.data_ptr(), 0, allbits.numel(), isa)
    ref = allbits.float()
    assert torch.equal(torch.isnan(up), torch.isnan(ref))
    assert torch.equal(up[~torch.isnan(ref)], ref[~torch.isnan(ref)])


# ---------------------------------------------------------------- the wheel (slow)

WHEEL_CHECK = r"""
import torch, muscle_fast
from muscle_fast.ops.compat_loss import native
from muscle_fast.ops.compat_loss.reference import compat_loss_reference
ok, why = native.native_available(); assert ok, why
import sys
assert native._native.__file__.startswith(sys.prefix), native._native.__file__
assert muscle_fast.__file__.startswith(sys.prefix), muscle_fast.__file__
torch.manual_seed(0)
z, o, w = (torch.randn(2, 8, 1000) * 3 for _ in range(3))
y = torch.randint(0, 1000, (16,))
g = torch.empty_like(z)
s = native.compat_loss_native(z, y, o, w, None, g, torch.tensor(1.0), mask_mode=1,
    inv_temperature=0.5, kl_weight=1.0, ce_weight=0.0, ignore_index=-100, old_label_logprob=False)
x = z.double().requires_grad_(True)
ref = compat_loss_reference(x, y, o.double(), w.double(), reduction="none")
ref.sum().backward()
assert torch.allclose(s[:, 0].double(), ref.detach().reshape(-1), atol=1e-5), "loss"
assert torch.allclose(g.double(), x.grad, atol=1e-6), "grad"
print("wheel ok", native._native.best_isa())
"""


@pytest.mark.slow
def test_wheel_installs_and_runs(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(ROOT),
        ],
        check=True,
        env={**os.environ, "MUSCLE_FAST_REQUIRE_NATIVE": "1"},
    )
    wheels = list(dist.glob("muscle_fast-*.whl"))
    assert len(wheels) == 1
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # torch (and numpy) from this interpreter's environment, never a fresh torch download
    (Path(site) / "host_torch.pth").write_text(
        str(Path(torch.__file__).resolve().parents[1]) + "\n"
    )
    subprocess.run(
        # --ignore-installed: the host environment seen through the .pth may hold an editable
        # muscle_fast, which pip would otherwise call "already installed"
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
         str(wheels[0])], check=True
    )
    out = subprocess.run(
        [str(py), "-c", WHEEL_CHECK], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wheel ok" in out.stdout


def test_offsets_above_2_pow_31(tmp_path):
    """Row offsets are 64-bit: the second row starts 2^31 + 17 elements in (a sparse mmapped file,
    so only the pages of the two rows are ever touched)."""
    V, gap = 1000, 2**31 + 17
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate((gap + V) * 2)
    base = torch.from_file(str(path), shared=True, size=gap + V, dtype=torch.bfloat16)
    z = base.as_strided((2, 1, V), (gap, V, 1))
    g = torch.Generator().manual_seed(8)
    z[0, 0].copy_(torch.randn(V, generator=g))
    z[1, 0].copy_(torch.randn(V, generator=g))
    o = torch.randn(2, 1, V, generator=g).to(torch.bfloat16)
    y = torch.tensor([3, 999])
    got = run_native(z, y, o, None, None, None, 1.0, mode=MaskMode.ALL_OLD, ce_weight=0.5)
    small = run_native(z.contiguous(), y, o, None, None, None, 1.0, mode=MaskMode.ALL_OLD, ce_weight=0.5)
    assert torch.equal(got, small)
    del z, base
