"""The readable PyTorch statement of the MUSCLE compatibility loss (docs/SPEC.md section 2).

This file is the ground truth: every backend is tested against ``compat_loss_reference`` run in
float64. ``impl="torch"`` runs it in the input's dtype upcast to float32, with PyTorch autograd
for the gradient. It favours clarity over speed and memory ([N, V] temporaries everywhere).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Union

import torch
import torch.nn.functional as F

MASKS = ("muscle", "old_correct", "token_likelihood", "sequence_likelihood", "all_old")
MASKS_NEEDING_NEW = ("muscle", "token_likelihood", "sequence_likelihood")
REDUCTIONS = ("mean", "sum", "none")


@dataclass
class CompatStats:
    """Per-call statistics of the compatibility loss, each a 0-dim float32 tensor (no host sync).

    Means are over valid (not ignored) tokens; a field of a teacher that was not given is None;
    with no valid token every rate and mean is 0.
    """

    n_valid: torch.Tensor
    frac_to_old: torch.Tensor
    acc_student: torch.Tensor
    acc_old: Optional[torch.Tensor]
    acc_new: Optional[torch.Tensor]
    kl_old: Optional[torch.Tensor]
    kl_new: Optional[torch.Tensor]
    ce: torch.Tensor

    def to_dict(self, prefix: str = "") -> dict:
        """Python floats for a training log (this syncs with the device once)."""
        present = {f.name: getattr(self, f.name) for f in fields(self)}
        present = {k: v for k, v in present.items() if v is not None}
        values = torch.stack([v.float() for v in present.values()]).tolist()
        return {prefix + k: v for k, v in zip(present, values)}


def sequence_segments(
    labels_shape: torch.Size, sequence_ids: Optional[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """Segment index in [0, n_segments) of every flattened token, for ``"sequence_likelihood"``.

    A sequence is a row of a [B, T] input; with ``sequence_ids`` it is a run of equal
    consecutive values (packed batches), and a run never continues across two rows.
    """
    n = labels_shape.numel()
    row_len = labels_shape[-1] if len(labels_shape) == 2 else n
    idx = torch.arange(n, device=device)
    starts = (idx % max(row_len, 1)) == 0
    if sequence_ids is not None:
        ids = sequence_ids.reshape(-1)
        starts[1:] |= ids[1:] != ids[:-1]
    return torch.cumsum(starts.long(), 0) - 1


def sequence_likelihood_mask(
    student_logp: torch.Tensor, old_logp: torch.Tensor, valid: torch.Tensor, segments: torch.Tensor
) -> torch.Tensor:
    """m_i = sum_t log p_student(y_t) < sum_t log p_old(y_t) over the valid tokens of i's sequence."""
    zero = torch.zeros((), dtype=student_logp.dtype, device=student_logp.device)
    n = segments.numel()
    s = torch.zeros(n, dtype=student_logp.dtype, device=segments.device)
    o = torch.zeros(n, dtype=old_logp.dtype, device=segments.device)
    s.index_add_(0, segments, torch.where(valid, student_logp, zero))
    o.index_add_(0, segments, torch.where(valid, old_logp, zero.to(old_logp.dtype)))
    return (s < o)[segments]


def _kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """sum_v p_t (log p_t - log p_s), with 0 where p_t == 0 (also where log p_s == -inf)."""
    p = teacher_logp.exp()
    terms = torch.where(p == 0, torch.zeros_like(p), p * (teacher_logp - student_logp))
    return terms.sum(-1)


def _sparse_kl(teacher, zt: torch.Tensor) -> torch.Tensor:
    """The k+1-category KL of a ``SparseTeacher`` against student logits ``zt`` = z / T
    (docs/SPEC.md section 2, "A teacher given sparsely"): sum_K p_j (log p_j - log q_j) +
    P_tail (log P_tail - log Q_tail), terms with p = 0 being 0, with
    log Q_tail = logsumexp of zt over the columns outside K - logsumexp of zt over all."""
    compute = zt.dtype
    k = teacher.indices.shape[-1]
    idx = teacher.indices.reshape(-1, k).long()
    lp = teacher.logprobs.reshape(-1, k).to(compute)
    tail = teacher.tail_logprob.reshape(-1).to(compute)
    lse = torch.logsumexp(zt, 1)
    top = _kl(lp, zt.gather(1, idx) - lse[:, None])
    outside = zt.scatter(1, idx, float("-inf"))
    # every column outside K at -inf (or none, k = V): Q_tail = 0; its logsumexp is taken on a
    # safe stand-in so that the gradient of the branch not taken is 0, not NaN
    has_tail = (outside > float("-inf")).any(1)
    lse_outside = torch.logsumexp(torch.where(has_tail[:, None], outside, 0.0), 1)
    log_q_tail = torch.where(has_tail, lse_outside, float("-inf")) - lse
    p_tail = tail.exp()
    rest = torch.where(p_tail == 0, 0.0, p_tail * (tail - log_q_tail))
    return top + rest


def _is_sparse(teacher) -> bool:
    return teacher is not None and not isinstance(teacher, torch.Tensor)


def compat_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logits,
    new_logits=None,
    *,
    mask: Union[str, torch.Tensor] = "muscle",
    temperature: float = 2.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: Union[None, int, float, torch.Tensor] = None,
    sequence_ids: Optional[torch.Tensor] = None,
    return_stats: bool = False,
):
    """docs/SPEC.md section 2, literally. Inputs are assumed valid (``fused_compat_loss`` checks them).

    A teacher is its logits or a ``muscle_fast.SparseTeacher`` (its stored values are the
    teacher: the KL over its k ids and tail bucket, its stored argmax and label log-probability).
    Computes in float64 for float64 ``logits``, else in float32. Differentiable in ``logits``.
    """
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    vocab = logits.shape[-1]
    lead = labels.shape
    z = logits.reshape(-1, vocab).to(compute)
    y = labels.reshape(-1)
    o = None if _is_sparse(old_logits) else old_logits.reshape(-1, vocab).to(compute)
    w = (None if new_logits is None or _is_sparse(new_logits)
         else new_logits.reshape(-1, vocab).to(compute))
    t = float(temperature)

    valid = y != ignore_index
    in_range = (y >= 0) & (y < vocab)
    y_idx = torch.where(in_range, y, torch.zeros_like(y)).unsqueeze(1)
    nan = torch.full((), float("nan"), dtype=compute, device=z.device)

    student_logp_t = F.log_softmax(z / t, dim=-1)
    student_logp = F.log_softmax(z, dim=-1)

    def kl(teacher, x):
        if teacher is None:
            return None
        if _is_sparse(teacher):
            return _sparse_kl(teacher, z / t)
        return _kl(F.log_softmax(x / t, dim=-1), student_logp_t)

    def argmax(teacher, x):
        return teacher.argmax.reshape(-1) if _is_sparse(teacher) else x.argmax(-1)

    kl_old = kl(old_logits, o)
    kl_new = kl(new_logits, w)
    student_logp_y = torch.where(in_range, student_logp.gather(1, y_idx).squeeze(1), nan)
    ce = -student_logp_y

    with torch.no_grad():
        if isinstance(mask, torch.Tensor):
            to_old = mask.reshape(-1).to(torch.bool)
        elif mask == "muscle":
            to_old = z.argmax(-1) != y
        elif mask == "old_correct":
            to_old = argmax(old_logits, o) == y
        elif mask in ("token_likelihood", "sequence_likelihood"):
            if _is_sparse(old_logits):
                old_logp_y = old_logits.label_logprob.reshape(-1).to(compute)
            else:
                old_logp_y = F.log_softmax(o, dim=-1).gather(1, y_idx).squeeze(1)
            if mask == "token_likelihood":
                to_old = student_logp_y < old_logp_y
            else:
                segments = sequence_segments(lead, sequence_ids, z.device)
                to_old = sequence_likelihood_mask(student_logp_y, old_logp_y, valid, segments)
        elif mask == "all_old":
            to_old = torch.ones_like(valid)
        else:
            raise ValueError(f"unknown mask {mask!r}")

    # A term whose weight is 0 is left out, not multiplied: 0 * inf would be NaN.
    loss_i = torch.zeros_like(ce)
    if kl_weight != 0:
        kl_sel = torch.where(to_old, kl_old, torch.zeros_like(kl_old) if kl_new is None else kl_new)
        loss_i = loss_i + kl_weight * kl_sel
    if ce_weight != 0:
        loss_i = loss_i + ce_weight * ce
    loss_i = torch.where(in_range | ~valid, loss_i, nan)
    loss_i = torch.where(valid, loss_i, torch.zeros_like(loss_i))

    n_valid = valid.sum()
    if reduction == "none":
        loss = loss_i.reshape(lead)
    elif reduction == "sum":
        loss = loss_i.sum()
    elif num_items is not None:
        loss = loss_i.sum() / torch.as_tensor(num_items, dtype=compute, device=z.device)
    else:
        loss = loss_i.sum() / n_valid.clamp(min=1).to(compute)
    if not return_stats:
        return loss

    with torch.no_grad():
        den = n_valid.clamp(min=1).to(compute)

        def mean(x):
            return torch.where(valid, x.to(compute), den.new_zeros(())).sum() / den

        stats = CompatStats(
            n_valid=n_valid.to(compute),
            frac_to_old=mean(to_old),
            acc_student=mean(z.argmax(-1) == y),
            acc_old=mean(argmax(old_logits, o) == y),
            acc_new=None if new_logits is None else mean(argmax(new_logits, w) == y),
            kl_old=mean(kl_old),
            kl_new=None if kl_new is None else mean(kl_new),
            ce=mean(ce),
        )
    return loss, stats
