"""Randomised property test: any shape and option mix agrees with the float64 reference."""
import pytest
import torch
from conftest import DEVICE
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_compat_loss import FUSED, check_case, make_inputs

from muscle_fast.ops.compat_loss import triton as triton_ops
from muscle_fast.ops.compat_loss.reference import MASKS, sequence_segments


def likelihood_margin(logits, labels, old, mask):
    """Smallest float64 gap |log p_student(y) - log p_old(y)| (per token, or per sequence) that
    the likelihood masks decide on. Below float32's resolution of these log-probabilities either
    side of the comparison is a correct float32 answer, so such draws are not informative."""
    v = logits.shape[-1]
    y = labels.reshape(-1)
    valid = y != -100
    idx = torch.where(valid, y, 0).unsqueeze(1)
    ls = torch.log_softmax(logits.reshape(-1, v).double(), -1).gather(1, idx).squeeze(1)
    lo = torch.log_softmax(old.reshape(-1, v).double(), -1).gather(1, idx).squeeze(1)
    gap = torch.where(valid, ls - lo, torch.zeros_like(ls))
    if mask == "sequence_likelihood":
        seg = sequence_segments(labels.shape, None, labels.device)
        gap = torch.zeros_like(gap).index_add_(0, seg, gap)[seg]
    gap = gap[valid].abs()
    return float(gap.min()) if gap.numel() else float("inf")


# (student, old, new) offsets added to a draw's rows: most draws none; the rest far from 0,
# where only differences to each row's maximum may enter the arithmetic (issue #23 item 3)
OFFSETS = [(0.0, 0.0, 0.0)] * 4 + [(1e4, -1e4, 0.0), (1e7, 1e7, -1e7), (1e10, 0.0, 1e10),
                                   (1e30, -1e30, 1e30), (0.0, 1e38, 0.0), (-1e30, 0.0, 1e4)]


@pytest.mark.parametrize("impl", FUSED)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 6),
    vocab=st.integers(1, 90),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    mask=st.sampled_from(MASKS + ("tensor",)),
    temperature=st.sampled_from([0.5, 1.0, 1.7, 4.0]),
    kl_weight=st.sampled_from([0.0, 0.5, 1.0]),
    ce_weight=st.sampled_from([0.0, 0.3, 1.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    with_new=st.booleans(),
    ignored=st.integers(0, 4),
    block=st.sampled_from([16, 8192]),
    scale=st.sampled_from([1.0, 4.0, 20.0]),
    offsets=st.sampled_from(OFFSETS),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_options_match_reference(impl, monkeypatch, b, t, vocab, dtype, mask, temperature,
                                        kl_weight, ce_weight, reduction, with_new, ignored, block,
                                        scale, offsets, seed):
    torch.manual_seed(seed)
    monkeypatch.setattr(triton_ops, "MAX_FUSED_BLOCK_V", block)
    monkeypatch.setattr(triton_ops, "LOOP_BLOCK_V", min(block, 4096))
    if kl_weight == 0 and ce_weight == 0:
        kl_weight = 1.0
    if mask in ("muscle", "token_likelihood", "sequence_likelihood"):
        with_new = True
    logits, labels, old, new = make_inputs((b, t), vocab, dtype, scale=scale,
                                           n_ignored=min(ignored, b * t), new=with_new)
    if any(offsets):  # rows far from 0 (float16 holds up to 65504: its offsets stop at 1e4)
        cap = 1e4 if dtype == torch.float16 else float("inf")
        logits, old, new = (None if x is None else (x.float() + max(-cap, min(c, cap))).to(dtype)
                            for x, c in zip((logits, old, new), offsets))
    if mask in ("token_likelihood", "sequence_likelihood"):
        assume(likelihood_margin(logits, labels, old, mask) > 1e-4)
    m = (torch.rand(b, t, device=DEVICE) < 0.5) if mask == "tensor" else mask
    check_case(impl, logits, labels, old, new, mask=m, temperature=temperature,
               kl_weight=kl_weight, ce_weight=ce_weight, reduction=reduction)
