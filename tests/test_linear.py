"""fused_linear_compat_loss: every fused backend against the float64 reference and the materialised path."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_pass_rule, matrix, max_err

import muscle_fast as mf
from muscle_fast.linear import fused_linear_compat_loss
from muscle_fast.loss import fused_compat_loss
from muscle_fast.ops.compat_loss.reference import compat_loss_reference
from muscle_fast.ops.linear_compat_loss import function as linear_ops

FUSED = [i for i in ("triton", "native") if mf.available_impls(DEVICE)[i].available]
FUSED_PARAMS = [pytest.param(i, id=i) for i in FUSED]
# The chunked pass (GEMMs, bias, frozen weight, ignored rows, options) is one code path around
# the row kernel for every backend; the Triton row kernel itself is checked on every option by
# test_compat_loss. So the default run reaches Triton here through one case a feature it feeds
# the row kernel (a mask, a missing teacher, per-row upstream, low precision, several chunks,
# teacher logits, no valid row); its other cases (seconds each, interpreted) are slow.
SLOW_TRITON = [pytest.param(i, id=i, marks=[pytest.mark.slow] if i == "triton" else [])
               for i in FUSED]
STAT_FIELDS = ("n_valid", "frac_to_old", "acc_student", "acc_old", "acc_new", "kl_old", "kl_new", "ce")
MASKS = ("muscle", "old_correct", "token_likelihood", "sequence_likelihood", "all_old")


def make_inputs(lead=(23,), hidden=16, old_hidden=24, vocab=41, dtype=torch.float32, bias=True,
                n_ignored=3, new=True, teachers="gemm"):
    """A student lm_head close to the teachers', labels mostly the old teacher's argmax.

    teachers: "gemm" (hidden, weight, bias per teacher) or "logits" (materialised teacher logits).
    """
    def head(h_size):
        w = torch.randn(vocab, h_size, device=DEVICE) / h_size ** 0.5
        return w, (0.5 * torch.randn(vocab, device=DEVICE) if bias else None)

    x = torch.randn(*lead, hidden, device=DEVICE) * 2
    w, b = head(hidden)
    t = {"old_hidden": torch.randn(*lead, old_hidden, device=DEVICE) * 2}
    t["old_weight"], t["old_bias"] = head(old_hidden)
    if new:
        t["new_hidden"] = (x + 0.5 * torch.randn_like(x)) * 1.5
        nw, nb = head(hidden)
        t["new_weight"], t["new_bias"] = w + 0.3 * nw, nb
    old_logits = F.linear(t["old_hidden"], t["old_weight"], t["old_bias"])
    labels = torch.where(torch.rand(lead, device=DEVICE) < 0.6, old_logits.argmax(-1),
                         torch.randint(0, vocab, lead, device=DEVICE))
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), device=DEVICE)[:n_ignored]] = -100
    cast = lambda v: None if v is None else v.to(dtype)
    t = {k: cast(v) for k, v in t.items()}
    if teachers == "logits":
        t = {f"{name}_logits": F.linear(t[f"{name}_hidden"], t[f"{name}_weight"], t[f"{name}_bias"])
             for name in ("old", "new") if f"{name}_hidden" in t}
    return x.to(dtype), w.to(dtype), cast(b), labels, t


def _teacher_logits(t, name, dtype=None):
    if f"{name}_logits" in t:
        z = t[f"{name}_logits"]
        return z if dtype is None else z.to(dtype)
    if f"{name}_hidden" not in t:
        return None
    h, w, b = t[f"{name}_hidden"], t[f"{name}_weight"], t[f"{name}_bias"]
    if dtype is not None:
        h, w, b = h.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
    return F.linear(h, w, b)


def _leaves(x, w, b, dtype=None, frozen_weight=False):
    cast = (lambda v: v.detach().clone()) if dtype is None else (lambda v: v.detach().to(dtype))
    xs = cast(x).requires_grad_(True)
    ws = cast(w).requires_grad_(not frozen_weight)
    bs = None if b is None else cast(b).requires_grad_(True)
    return xs, ws, bs


def _grads(loss, leaves, upstream):
    loss.backward(upstream.to(loss.dtype))
    return [None if v is None or not v.requires_grad else v.grad for v in leaves]


def check_case(impl, x, w, b, labels, teachers, *, frozen_weight=False, **kw):
    """Pass rule for loss, d hidden, d weight, d bias and every stat against ref64, with base
    errors from (a) the torch reference at the input dtype on materialised logits and (b)
    fused_compat_loss with the same backend on those materialised logits."""
    dtype = x.dtype
    leaves = _leaves(x, w, b, frozen_weight=frozen_weight)
    loss, stats = fused_linear_compat_loss(
        leaves[0], leaves[1], labels, bias=leaves[2], impl=impl, return_stats=True,
        **teachers, **kw)
    up = torch.randn(loss.shape, device=loss.device)
    grads = _grads(loss, leaves, up)

    def materialised(impl_, compute):
        lv = _leaves(x, w, b, dtype=compute, frozen_weight=frozen_weight)
        z = F.linear(*lv)
        old = _teacher_logits(teachers, "old", compute)
        new = _teacher_logits(teachers, "new", compute)
        if impl_ == "ref64":
            kw64 = {k: v for k, v in kw.items() if k not in ("chunk_size", "validate")}
            out = compat_loss_reference(z, labels, old, new, return_stats=True, **kw64)
        else:
            kwm = {k: v for k, v in kw.items() if k != "chunk_size"}
            out = fused_compat_loss(z, labels, old, new, impl=impl_, return_stats=True, **kwm)
        return out[0], out[1], _grads(out[0], lv, up)

    loss64, stats64, grads64 = materialised("ref64", torch.float64)
    bases = {"torch same dtype": materialised("torch", dtype),
             f"{impl} on materialised logits": materialised(impl, dtype)}
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    for base_name, (loss_b, stats_b, grads_b) in bases.items():
        what = f"{impl} vs {base_name}"
        assert_pass_rule(loss, loss_b, loss64, dtype, f"{what}: loss")
        for name, g, gb, g64, leaf in zip(("hidden", "weight", "bias"), grads, grads_b, grads64,
                                          leaves):
            assert (g is None) == (g64 is None), name
            if g is not None:
                assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
                assert_pass_rule(g, gb, g64, dtype, f"{what}: grad {name}")
        for name in STAT_FIELDS:
            got, want = getattr(stats, name), getattr(stats64, name)
            assert (got is None) == (want is None), name
            if got is not None:
                assert got.dtype == torch.float32 and got.dim() == 0, name
                assert_pass_rule(got, getattr(stats_b, name), want, dtype, f"{what}: stats.{name}")
    return loss, grads


# --------------------------------------------------------------------------- the matrix

@pytest.mark.parametrize("mask,impl", matrix(
    MASKS, FUSED, slow_if=lambda mask, impl: impl == "triton"
    and mask not in ("muscle", "sequence_likelihood")))
def test_masks(impl, mask):
    x, w, b, labels, t = make_inputs()
    check_case(impl, x, w, b, labels, t, mask=mask, chunk_size=7)


@pytest.mark.parametrize("impl", SLOW_TRITON)
def test_caller_mask_tensor(impl):
    x, w, b, labels, t = make_inputs()
    m = torch.rand(labels.shape, device=DEVICE) < 0.5
    check_case(impl, x, w, b, labels, t, mask=m, chunk_size=5)


@pytest.mark.parametrize("mask,impl", matrix(
    ["old_correct", "all_old"], FUSED,
    slow_if=lambda mask, impl: impl == "triton" and mask == "all_old"))
def test_without_new_teacher(impl, mask):
    x, w, b, labels, t = make_inputs(new=False)
    check_case(impl, x, w, b, labels, t, mask=mask, chunk_size=6)


@pytest.mark.parametrize("frozen,bias,impl", matrix(
    [pytest.param(False, id="trained"), pytest.param(True, id="frozen")],
    [pytest.param(True, id="bias"), pytest.param(False, id="no_bias")], FUSED,
    slow_if=lambda frozen, bias, impl: impl == "triton" and (frozen or not bias)))
def test_bias_and_frozen_weight(impl, bias, frozen):
    x, w, b, labels, t = make_inputs(bias=bias)
    _, grads = check_case(impl, x, w, b, labels, t, frozen_weight=frozen, chunk_size=8)
    assert (grads[1] is None) == frozen


@pytest.mark.parametrize("reduction,impl", matrix(
    ["mean", "sum", "none"], FUSED,
    slow_if=lambda reduction, impl: impl == "triton" and reduction != "none"))
def test_reductions(impl, reduction):
    x, w, b, labels, t = make_inputs()
    check_case(impl, x, w, b, labels, t, reduction=reduction, chunk_size=9)


@pytest.mark.parametrize("impl", SLOW_TRITON)
def test_reduction_none_frozen_weight(impl):
    x, w, b, labels, t = make_inputs(bias=False)
    check_case(impl, x, w, b, labels, t, reduction="none", frozen_weight=True, chunk_size=4)


@pytest.mark.parametrize("dtype,impl", matrix(
    [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")], FUSED,
    slow_if=lambda dtype, impl: impl == "triton" and dtype == torch.float16))
def test_low_precision(impl, dtype):
    x, w, b, labels, t = make_inputs(dtype=dtype)
    check_case(impl, x, w, b, labels, t, chunk_size=10)


@pytest.mark.parametrize("shape,impl", matrix([
    pytest.param(((1,), None), id="N1"),
    pytest.param(((29,), 1), id="chunk1"),
    pytest.param(((31,), 8), id="N31-chunk8"),
    pytest.param(((31,), 31), id="one-chunk"),
    pytest.param(((31,), 100), id="chunk-above-N"),
    pytest.param(((3, 11), 4), id="BTH"),
], FUSED, slow_if=lambda shape, impl: impl == "triton" and shape[1] not in (None, 8)))
def test_shapes_and_chunks(impl, shape):
    lead, chunk = shape
    x, w, b, labels, t = make_inputs(lead=lead, n_ignored=min(2, lead[-1] - 1))
    kw = {"mask": "sequence_likelihood"} if len(lead) == 2 else {}
    check_case(impl, x, w, b, labels, t, chunk_size=chunk, **kw)


@pytest.mark.parametrize("impl", FUSED_PARAMS)
def test_teacher_logits_and_mixed_forms(impl):
    x, w, b, labels, t = make_inputs(teachers="logits")
    check_case(impl, x, w, b, labels, t, chunk_size=6)
    x, w, b, labels, t = make_inputs()
    t["new_logits"] = F.linear(t.pop("new_hidden"), t.pop("new_weight"), t.pop("new_bias"))
    check_case(impl, x, w, b, labels, t, mask="token_likelihood", chunk_size=6)


@pytest.mark.parametrize("impl", SLOW_TRITON)
def test_temperature_weights_num_items(impl):
    x, w, b, labels, t = make_inputs()
    check_case(impl, x, w, b, labels, t, temperature=0.7, kl_weight=0.4, ce_weight=0.6,
               num_items=50, chunk_size=7)


@pytest.mark.parametrize("impl", SLOW_TRITON)
def test_packed_sequence_ids(impl):
    x, w, b, labels, t = make_inputs(lead=(2, 13))
    ids = torch.tensor([0] * 5 + [1] * 8 + [2] * 9 + [3] * 4, device=DEVICE).view(2, 13)
    check_case(impl, x, w, b, labels, t, mask="sequence_likelihood", sequence_ids=ids,
               chunk_size=6)


@pytest.mark.parametrize("impl", FUSED_PARAMS)
def test_all_ignored_is_zero(impl):
    x, w, b, labels, t = make_inputs(lead=(6,), n_ignored=6)
    leaves = _leaves(x, w, b)
    loss = fused_linear_compat_loss(*leaves[:2], labels, bias=leaves[2], impl=impl, **t)
    loss.backward()
    assert loss.item() == 0
    for v in leaves:
        assert torch.count_nonzero(v.grad) == 0


@pytest.mark.parametrize("impl", SLOW_TRITON)
def test_teachers_get_no_grad(impl):
    x, w, b, labels, t = make_inputs()
    t = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    leaves = _leaves(x, w, b)
    loss = fused_linear_compat_loss(*leaves[:2], labels, bias=leaves[2], impl=impl, **t)
    loss.backward()
    assert all(v.grad is None for v in t.values())
    assert all(v.grad is not None for v in leaves)


@pytest.mark.parametrize("impl", SLOW_TRITON)
def test_ignored_rows_cost_no_gemm(impl, monkeypatch):
    """On CPU the chunk loop visits only valid tokens: 23 - 3 ignored = 20 rows, 3 chunks of 7."""
    if DEVICE.type != "cpu":
        pytest.skip("compaction of ignored rows is CPU-only")
    seen = []
    real = linear_ops._Linear.logits
    monkeypatch.setattr(linear_ops._Linear, "logits",
                        lambda self, h: seen.append(h.shape[0]) or real(self, h))
    x, w, b, labels, t = make_inputs()
    fused_linear_compat_loss(x, w, labels, bias=b, impl=impl, chunk_size=7, **t)
    assert seen == [7, 7, 7, 7, 7, 7, 6, 6, 6]  # student, old, new per chunk


def test_default_chunk_size_from_budget():
    cpu = torch.device("cpu")
    # 128 MiB of fp32 logits for 3 models at V=32000: 349 tokens
    assert linear_ops.default_chunk_size(4096, 32000, 3, cpu) == (128 << 20) // (4 * 32000 * 3)
    assert linear_ops.default_chunk_size(10, 32000, 3, cpu) == 10
    assert linear_ops.default_chunk_size(10 ** 6, 10 ** 7, 3, cpu) == linear_ops.MIN_CHUNK
    assert linear_ops.default_chunk_size(0, 50, 1, cpu) == 1


def test_torch_impl_is_the_materialised_expression():
    x, w, b, labels, t = make_inputs(dtype=torch.float64)
    got = fused_linear_compat_loss(x, w, labels, bias=b, **t)
    want = compat_loss_reference(F.linear(x, w, b), labels, _teacher_logits(t, "old"),
                                 _teacher_logits(t, "new"))
    assert max_err(got, want) == 0


def test_backward_twice_is_an_error():
    impl = FUSED[0] if FUSED else pytest.skip("no fused backend")
    x, w, b, labels, t = make_inputs()
    leaves = _leaves(x, w, b)
    loss = fused_linear_compat_loss(*leaves[:2], labels, bias=leaves[2], impl=impl, **t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("bad,match", [
    pytest.param({"old_hidden": None}, "old_hidden is missing", id="half-teacher"),
    pytest.param({"old_logits": torch.zeros(23, 41)}, "not both", id="both-forms"),
    pytest.param({"old_weight": torch.zeros(40, 24)}, "one tokenizer", id="teacher-vocab"),
    pytest.param({"old_hidden": torch.zeros(22, 24)}, "old_hidden has shape", id="teacher-lead"),
    pytest.param({"weight": torch.zeros(41, 15)}, "weight has shape", id="student-H"),
    pytest.param({"bias": torch.zeros(40)}, "bias has shape", id="bias-shape"),
    pytest.param({"chunk_size": 0}, "chunk_size", id="chunk0"),
    pytest.param({"labels": torch.full((23,), 41)}, "labels must lie", id="label-range"),
    pytest.param({"mask": "token_likelihood", "new_hidden": None, "new_weight": None,
                  "new_bias": None}, "needs new_logits", id="mask-needs-new"),
])
def test_bad_input_is_a_clear_error(bad, match):
    x, w, b, labels, t = make_inputs()
    args = {"hidden": x, "weight": w, "labels": labels, "bias": b, **t}
    args.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in bad.items()})
    args = {k: v for k, v in args.items() if v is not None or k in ("bias",)}
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_compat_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_inplace_backward_is_refused_with_the_reason():
    """There is no [N, V] logits tensor to overwrite: each chunk's gradient already overwrites
    the chunk's logits. A clear TypeError says so (issue 23 item 8); a misspelt option is still a
    TypeError naming it."""
    x, w, b, labels, t = make_inputs()
    with pytest.raises(TypeError, match=r"no inplace_backward option.*chunk's logits"):
        fused_linear_compat_loss(x, w, labels, bias=b, inplace_backward=True, **t)
    with pytest.raises(TypeError, match="temprature"):
        fused_linear_compat_loss(x, w, labels, bias=b, temprature=2.0, **t)


def test_dtype_messages_name_every_accepted_dtype():
    """float64 hidden states run (impl="torch"): the message names it."""
    x, w, b, labels, t = make_inputs()
    with pytest.raises(TypeError, match=r"hidden must be float32, bfloat16, float16 or float64"):
        fused_linear_compat_loss(x.long(), w, labels, bias=b, **t)


def test_dtype_mismatch_is_an_error():
    x, w, _, labels, t = make_inputs()
    with pytest.raises(TypeError, match="weight is torch.bfloat16"):
        fused_linear_compat_loss(x, w.bfloat16(), labels, **t)


# --------------------------------------------------------------------------- memory, compile

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from muscle_fast.linear import fused_linear_compat_loss
    n, v, h = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    x = torch.randn(n, h, requires_grad=True); w = (torch.randn(v, h) / h ** 0.5).requires_grad_()
    oh, ow = torch.randn(n, h), torch.randn(v, h) / h ** 0.5
    nh, nw = torch.randn(n, h), torch.randn(v, h) / h ** 0.5
    y = torch.randint(0, v, (n,))
    def step(rows):
        loss = fused_linear_compat_loss(x[rows], w, y[rows], old_hidden=oh[rows], old_weight=ow,
                                        new_hidden=nh[rows], new_weight=nw, impl="native")
        loss.backward()
        x.grad = w.grad = None
    def status_kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))
    step(slice(0, 8))  # first call: lazy imports (about 150 MB of RSS) before the measurement
    with open("/proc/self/clear_refs", "w") as f:  # peak RSS (VmHWM) := current RSS
        f.write("5")
    before = status_kib("VmRSS:")
    step(slice(None))
    print(json.dumps({"growth_bytes": (status_kib("VmHWM:") - before) * 1024}))
""")



def _peak_growth(n, v, h):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(n), str(v), str(h)],
                         capture_output=True, text=True, env=env, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_bytes"]


@pytest.mark.skipif(not mf.available_impls("cpu")["native"].available,
                    reason="needs the native CPU backend")
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_peak_memory_independent_of_n():
    """Peak RSS growth of forward+backward at N=4096 vs N=512 (V=32000, H=64, three GEMM models):
    the materialised path adds 3 x 4096 x 32000 x 4 B = 1.57 GB (plus its gradient); chunked, the
    growth is one chunk of logits (128 MiB), input-sized buffers (gradients, the fp32
    accumulator) and allocator/BLAS workspace of at most one chunk, whatever N."""
    n, v, h = 4096, 32000, 64
    small, large = _peak_growth(512, v, h), _peak_growth(n, v, h)
    input_sized = 4 * (2 * n * h + 2 * v * h)
    print(f"peak RSS growth: N=512 {small / 2**20:.0f} MiB, N={n} {large / 2**20:.0f} MiB")
    assert large <= small + input_sized + (64 << 20), (small, large)
    assert large <= 3 * n * v * 4 / 8, (small, large)


@pytest.mark.slow
@pytest.mark.skipif(not FUSED, reason="no fused backend")
def test_torch_compile_fullgraph():
    impl = "native" if "native" in FUSED else FUSED[0]
    x, w, b, labels, t = make_inputs()

    def step(x, w, b):
        return fused_linear_compat_loss(x, w, labels, bias=b, impl=impl, chunk_size=7,
                                        validate=False, **t)

    eager = _leaves(x, w, b)
    step(*eager).backward()
    compiled = _leaves(x, w, b)
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True)(*compiled)
    loss.backward()
    assert max_err(loss, step(*_leaves(x, w, b))) <= 1e-6
    for a, c in zip(eager, compiled):
        assert max_err(a.grad, c.grad) <= 1e-6
