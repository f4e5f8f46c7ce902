"""Rows far from 0 and a one-word vocabulary (issue #23 items 3-4), every fused backend.

The row statistics are carried relative to the row maxima (README.md beside the kernels, "Math
per row"), so a loss of order 1 stays exact whatever the logits' magnitude: a student row
constant at 1e30 has the same loss as one constant at 0. Before, the kernels subtracted absolute
values (`(o - z) / T` against `lse_s`) and returned 4.211 at 1e7, -46.6 at 1e10 and -2.6e21 at
1e30 (float64: 4.26-4.31), inf for an old teacher constant at 1e38, and -3.7e-9 at V = 1.
The vocabulary-parallel combination gets the same rows in tests/test_vocab_parallel.py.
"""
import math

import pytest
import torch
from conftest import DEVICE
from test_compat_loss import FUSED, check_case, make_inputs

import muscle_fast as mf
from muscle_fast.ops.compat_loss import triton as triton_ops
from muscle_fast.ops.compat_loss.vocab_parallel import VocabParallel

MAGNITUDES = (1e4, 1e7, 1e10, 1e30)
# (impl, Triton block path): the row kept in registers, or the streamed loop of 16-column blocks
PATHS = [pytest.param(i, p, id=f"{i}-{p}") for i in FUSED
         for p in (("fused", "loop") if i == "triton" else ("-",))]


@pytest.fixture
def path(request, monkeypatch):
    def use(block_path):
        if block_path == "loop":
            monkeypatch.setattr(triton_ops, "MAX_FUSED_BLOCK_V", 16)
            monkeypatch.setattr(triton_ops, "LOOP_BLOCK_V", 16)
    return use


def constant_student(dtype=torch.float32, vocab=23):
    """Two rows per magnitude c, the student constant at c (+c and -c), teachers of order 1."""
    lead = (2 * len(MAGNITUDES),)
    logits, labels, old, new = make_inputs(lead, vocab, n_ignored=0)
    c = torch.tensor([s * m for m in MAGNITUDES for s in (1, -1)], device=DEVICE)
    return torch.full_like(logits, 1.0) * c[:, None], labels, old, new


@pytest.mark.parametrize("impl,block_path", PATHS)
@pytest.mark.parametrize("mask", ["muscle", "token_likelihood", "all_old"])
def test_constant_student_rows(impl, block_path, mask, path):
    path(block_path)
    logits, labels, old, new = constant_student()
    loss, _, stats = check_case(impl, logits, labels, old, new, mask=mask, ce_weight=1.0,
                                reduction="none")
    assert bool(torch.isfinite(loss).all())
    assert float(stats.ce) == pytest.approx(math.log(23), abs=1e-5)  # a constant row: log V


@pytest.mark.parametrize("impl,block_path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_offset_by_large_constants(impl, block_path, dtype, path):
    """Student and teachers of order 1 around different large offsets per row (a loss of order
    1: only the differences to each row's maximum matter)."""
    path(block_path)
    logits, labels, old, new = make_inputs((6,), 29, n_ignored=1)
    off = torch.tensor([[1e7, 0, -1e7], [1e10, 1e10, 0], [-1e30, 1e30, 1e4],
                        [1e30, 1e30, 1e30], [0, 1e38, -1e38], [1e4, -1e4, 1e7]], device=DEVICE)
    logits, old, new = (x + off[:, j, None] for j, x in enumerate((logits, old, new)))
    logits, old, new = (x.to(dtype) for x in (logits, old, new))
    for mask in ("muscle", "all_old"):
        check_case(impl, logits, labels, old, new, mask=mask, ce_weight=0.5, temperature=2.0,
                   reduction="none")


@pytest.mark.parametrize("impl,block_path", PATHS)
@pytest.mark.parametrize("value", [1e38, -1e38, 3e38], ids=str)
def test_old_teacher_constant_at_the_float32_limit(impl, block_path, value, path):
    """float64: KL 0.126-ish; before, inf (the absolute (o - z) sum overflowed float32)."""
    path(block_path)
    logits, labels, old, new = make_inputs((5,), 31, n_ignored=1)
    old = torch.full_like(old, value)
    loss, _, stats = check_case(impl, logits, labels, old, None, mask="all_old", reduction="none")
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(stats.kl_old))


@pytest.mark.parametrize("impl,block_path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_word_vocabulary_is_exactly_zero(impl, block_path, dtype, path):
    """V = 1: every distribution is the point mass, so every KL, the CE and the gradient are
    exactly 0 (not a rounding residue of log-sum-exps), whatever the logits."""
    path(block_path)
    logits = torch.tensor([[0.3], [-7.1], [1e7], [-1e30], [2.5]], device=DEVICE).to(dtype)
    old = torch.tensor([[1.7], [1e38], [-3.0], [0.1], [5.0]], device=DEVICE).to(dtype)
    new = torch.tensor([[-2.2], [0.4], [9.0], [1e10], [-0.6]], device=DEVICE).to(dtype)
    labels = torch.tensor([0, 0, 0, 0, -100], device=DEVICE)
    for mask in ("muscle", "all_old", "token_likelihood"):
        z = logits.clone().requires_grad_(True)
        loss, stats = mf.fused_compat_loss(z, labels, old, new, impl=impl, mask=mask,
                                           ce_weight=1.0, reduction="none", return_stats=True)
        loss.sum().backward()
        assert bool((loss == 0).all()), loss
        assert float(stats.kl_old) == 0 and float(stats.kl_new) == 0 and float(stats.ce) == 0
        assert bool((z.grad == 0).all()), z.grad


@pytest.mark.parametrize("impl", ["torch"] + FUSED)
def test_one_word_vocabulary_vocab_parallel_launcher(impl):
    """The vocabulary-parallel launcher (partials, combination, gradient kernel) on one rank:
    V = 1 is exactly 0 there too, row statistics included."""
    z = torch.tensor([[[0.3], [1e7], [-1e30]]], device=DEVICE)
    o = torch.tensor([[[1.7], [1e38], [0.1]]], device=DEVICE)
    w = torch.tensor([[[-2.2], [0.4], [1e10]]], device=DEVICE)
    labels = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    grad = torch.full_like(z, float("nan"))
    launch = VocabParallel(impl, None, 0)
    for mode in (1, 3, 4):
        rows = launch(z, labels, o, w, None, grad, torch.tensor(1.0), mask_mode=mode,
                      inv_temperature=0.5, kl_weight=1.0, ce_weight=1.0, ignore_index=-100,
                      old_label_logprob=True)
        assert bool((rows[:, [0, 5, 6, 7, 8]] == 0).all()), rows
        assert bool((grad == 0).all()), grad
