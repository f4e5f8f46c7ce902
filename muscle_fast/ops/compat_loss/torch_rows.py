"""The row contract (README.md beside this file) in PyTorch, for dense and sparse teachers.

``compat_loss_torch_rows`` is backend ``"torch_rows"``: what the fused path runs for a sparse
teacher until a native or Triton row kernel takes one (``backends.Backend.sparse``), and the
readable oracle of those kernels. Rows are processed a chunk at a time, so the float32
temporaries are a few [chunk, V] blocks whatever the number of rows. Readable, not fast.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .contract import N_STATS, MaskMode, SparseCol, SparseRows, Stat

# Bytes of one float32 [chunk, V] temporary (about eight are live at once).
CHUNK_BYTES = 8 << 20


class _Teacher:
    """One teacher's view of a chunk: its KL against the student, its target distribution for
    the gradient, its argmax and its label log-probability at T = 1."""

    def __init__(self, kl, target, argmax, label_lp):
        self.kl, self.target, self.argmax, self.label_lp = kl, target, argmax, label_lp


def _dense(t: Tensor, zt: Tensor, lse_t: Tensor, k: float, yi: Tensor, need_label: bool,
           need_target: bool) -> _Teacher:
    tt = t * k
    lp = tt - torch.logsumexp(tt, -1, keepdim=True)
    p = lp.exp()
    # p == 0 terms are 0, also against a -inf student logit
    kl = torch.where(p == 0, 0.0, p * (lp - (zt - lse_t[:, None]))).sum(-1)
    label_lp = None
    if need_label:
        label_lp = t.gather(1, yi[:, None])[:, 0] - torch.logsumexp(t, -1)
    return _Teacher(kl, p if need_target else None, t.argmax(-1), label_lp)


def _sparse(s: SparseRows, zt: Tensor, lse_t: Tensor, compute, need_target: bool) -> _Teacher:
    idx = s.idx.long()
    lp = s.lp.to(compute)
    p = lp.exp()
    tail = s.row[:, SparseCol.TAIL].to(compute)
    p_tail = tail.exp()
    log_q = zt.gather(1, idx) - lse_t[:, None]
    kl_k = torch.where(p == 0, 0.0, p * (lp - log_q)).sum(-1)
    # log Q_tail as the logsumexp of the columns outside K: 1 - sum_K q_j cancels
    zt_tail = zt.scatter(1, idx, float("-inf"))
    lse_tail = torch.logsumexp(zt_tail, -1)
    kl_tail = torch.where(p_tail == 0, 0.0, p_tail * (tail - (lse_tail - lse_t)))
    target = None
    if need_target:
        # the tail mass spread over the columns outside K in proportion to the student
        spread = (p_tail > 0) & (lse_tail > float("-inf"))
        share = torch.exp(zt_tail - lse_tail[:, None])  # q_v / Q_tail outside K
        target = torch.where(spread[:, None], p_tail[:, None] * share, 0.0)
        target.scatter_(1, idx, p)
    return _Teacher(kl_k + kl_tail, target, s.row[:, SparseCol.ARGMAX].long(),
                    s.row[:, SparseCol.LABEL_LP].to(compute))


def compat_loss_torch_rows(
    logits: Tensor, labels: Tensor, old_logits: Optional[Tensor], new_logits: Optional[Tensor],
    mask: Optional[Tensor], grad: Optional[Tensor], scale: Tensor, *, mask_mode: int,
    inv_temperature: float, kl_weight: float, ce_weight: float, ignore_index: int,
    old_label_logprob: bool, old_sparse: Optional[SparseRows] = None,
    new_sparse: Optional[SparseRows] = None, chunk_rows: Optional[int] = None,
) -> Tensor:
    """Row statistics [B*T, N_STATS] float32; writes the scaled gradient into ``grad`` when given
    (``grad`` may be ``logits``). A teacher is its logits [B, T, V] or a ``SparseRows``."""
    B, T, V = logits.shape
    n = B * T
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    k = float(inv_temperature)
    assert (old_logits is None) != (old_sparse is None), "exactly one old teacher"
    assert new_logits is None or new_sparse is None
    need_label = mask_mode == MaskMode.TOKEN_LIKELIHOOD or old_label_logprob
    rows = torch.zeros((n, N_STATS), dtype=torch.float32, device=logits.device)
    z_all = logits.reshape(n, V)
    old_all = None if old_logits is None else old_logits.reshape(n, V)
    new_all = None if new_logits is None else new_logits.reshape(n, V)
    g_all = None
    if grad is not None:
        try:
            g_all = grad.view(n, V)
        except RuntimeError:  # strides that do not flatten: write a buffer, copy once
            g_all = torch.empty((n, V), dtype=grad.dtype, device=grad.device)
    chunk = chunk_rows or max(1, CHUNK_BYTES // (4 * max(V, 1)))
    scale_c = scale.to(compute)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        z = z_all[s:e].to(compute)  # a copy: the gradient may overwrite the logits below
        y = labels[s:e]
        valid = y != ignore_index
        in_range = (y >= 0) & (y < V)
        yi = torch.where(in_range, y, 0)
        zt = z * k
        lse_t = torch.logsumexp(zt, -1)
        lse_1 = torch.logsumexp(z, -1)
        z_y = z.gather(1, yi[:, None])[:, 0]
        ce = torch.where(in_range, lse_1 - z_y, float("nan"))
        z_arg = z.argmax(-1)
        want_grad = g_all is not None and kl_weight != 0
        if old_sparse is not None:
            old = _sparse(SparseRows(*(x[s:e] for x in old_sparse)), zt, lse_t, compute,
                          want_grad)
        else:
            old = _dense(old_all[s:e].to(compute), zt, lse_t, k, yi, need_label, want_grad)
        new = None
        if new_sparse is not None:
            new = _sparse(SparseRows(*(x[s:e] for x in new_sparse)), zt, lse_t, compute,
                          want_grad)
        elif new_all is not None:
            new = _dense(new_all[s:e].to(compute), zt, lse_t, k, yi, False, want_grad)

        if mask_mode == MaskMode.GIVEN:
            to_old = mask[s:e] != 0
        elif mask_mode == MaskMode.MUSCLE:
            to_old = z_arg != y
        elif mask_mode == MaskMode.OLD_CORRECT:
            to_old = old.argmax == y
        elif mask_mode == MaskMode.TOKEN_LIKELIHOOD:
            to_old = (z_y - lse_1) < old.label_lp
        elif mask_mode == MaskMode.ALL_OLD:
            to_old = torch.ones_like(valid)
        else:
            raise ValueError(f"unknown mask_mode {mask_mode}")

        # a term whose weight is 0 is left out, not multiplied: 0 * inf would be NaN
        loss = torch.zeros_like(ce)
        if kl_weight != 0:
            kl_new = new.kl if new is not None else torch.zeros_like(old.kl)
            loss = loss + kl_weight * torch.where(to_old, old.kl, kl_new)
        if ce_weight != 0:
            loss = loss + ce_weight * ce
        loss = torch.where(in_range, loss, float("nan"))
        cols = [None] * N_STATS
        cols[Stat.LOSS], cols[Stat.TO_OLD] = loss, to_old
        cols[Stat.HIT_STUDENT], cols[Stat.HIT_OLD] = z_arg == y, old.argmax == y
        cols[Stat.HIT_NEW] = (new.argmax == y) if new is not None else torch.zeros_like(valid)
        cols[Stat.KL_OLD] = old.kl
        cols[Stat.KL_NEW] = new.kl if new is not None else torch.zeros_like(ce)
        cols[Stat.CE] = ce
        cols[Stat.OLD_LOGP] = old.label_lp if need_label else torch.zeros_like(ce)
        out = torch.stack([c.to(torch.float32) for c in cols], 1)
        rows[s:e] = torch.where(valid[:, None], out, 0.0)

        if g_all is None:
            continue
        g = torch.zeros_like(z)
        if kl_weight != 0:
            q = torch.exp(zt - lse_t[:, None])
            if new is not None:
                target = torch.where(to_old[:, None], old.target, new.target)
                g = kl_weight * k * (q - target)
            else:  # no teacher term where the mask picks the (absent) new teacher
                g = torch.where(to_old[:, None], kl_weight * k * (q - old.target), 0.0)
        if ce_weight != 0:
            onehot = torch.zeros_like(z).scatter_(1, yi[:, None], 1.0)
            g = g + ce_weight * (torch.exp(z - lse_1[:, None]) - onehot)
        g = g * scale_c
        g = torch.where(in_range[:, None], g, float("nan"))
        g = torch.where(valid[:, None], g, 0.0)
        g_all[s:e] = g.to(g_all.dtype)
    if grad is not None and g_all.data_ptr() != grad.data_ptr():
        grad.copy_(g_all.view(B, T, V))
    return rows
