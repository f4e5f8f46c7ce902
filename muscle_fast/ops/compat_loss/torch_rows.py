"""The row contract (README.md beside this file) in PyTorch, for dense and sparse teachers.

``compat_loss_torch_rows`` is backend ``"torch_rows"``: what the fused path runs for a sparse
teacher until a native or Triton row kernel takes one (``backends.TAKES_SPARSE``), and a readable
oracle of those kernels. Rows are processed a chunk at a time, so the temporaries are a few
[chunk, V] blocks whatever the number of rows. Every sum is taken relative to the row maximum,
like the kernels' streams: ``e = exp((z - m) k)``, ``S = sum e``, ``q = e / S``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .contract import N_STATS, MaskMode, SparseCol, SparseRows, Stat

# Bytes of one [chunk, V] temporary (about six are live at once).
CHUNK_BYTES = 16 << 20
# Below this, a sum of exp((z - m) k) over the columns outside K may have lost terms to underflow
# (gaps to the row maximum beyond ~87 / k in float32): such rows take the tail's own maximum.
TINY = 2.0 ** -100


def _compact(device: torch.device) -> bool:
    """Redo only the tiny rows (found by reading a flag: free on the CPU), else every row (no
    host sync elsewhere)."""
    return device.type == "cpu"


class _Student:
    """One chunk of student rows: ``zs = z - m`` (m the row max, 0 for a row of -inf),
    ``e = exp(zs k)``, ``S = sum e``, and the same at T = 1."""

    def __init__(self, z: Tensor, k: float):
        m = z.amax(-1)
        self.ref = torch.where(torch.isfinite(m), m, 0.0)
        self.zs = z - self.ref[:, None]
        self.k = k
        self.e = torch.exp(self.zs * k) if k != 1 else torch.exp(self.zs)
        self.s = self.e.sum(-1)
        self.log_s = torch.log(self.s)
        self.e1 = self.e if k == 1 else torch.exp(self.zs)
        self.s1 = self.s if k == 1 else self.e1.sum(-1)
        self.log_s1 = torch.log(self.s1)

    def log_q(self, cols: Optional[Tensor] = None) -> Tensor:
        """log softmax(z k) over every column, or at ``cols`` [C, k'] only."""
        zs = self.zs if cols is None else self.zs.gather(1, cols)
        return zs * self.k - self.log_s[:, None]


class _Teacher:
    """One teacher on a chunk: its KL, argmax, label log-probability at T = 1 (old teacher),
    and ``sub_target(g, c)``: ``g -= c * p_teacher`` row-wise (the KL gradient's teacher part)."""

    def __init__(self, kl, argmax, label_lp, sub_target):
        self.kl, self.argmax, self.label_lp, self.sub_target = kl, argmax, label_lp, sub_target


def _kl_terms(p: Tensor, lp: Tensor, log_q: Tensor) -> Tensor:
    # terms with p == 0 are 0, also against a -inf student logit
    return torch.where(p == 0, 0.0, p * (lp - log_q)).sum(-1)


def _dense(t: Tensor, s: _Student, yi: Tensor, need_label: bool) -> _Teacher:
    tt = t * s.k
    lp = tt - torch.logsumexp(tt, -1, keepdim=True)
    p = lp.exp()
    kl = _kl_terms(p, lp, s.log_q())
    label_lp = None
    if need_label:
        label_lp = t.gather(1, yi[:, None])[:, 0] - torch.logsumexp(t, -1)

    def sub_target(g, c):
        g.addcmul_(p, c[:, None], value=-1.0)

    return _Teacher(kl, t.argmax(-1), label_lp, sub_target)


def _sparse(rows: SparseRows, s: _Student, compute) -> _Teacher:
    idx = rows.idx.long()
    lp = rows.lp.to(compute)
    p = lp.exp()
    tail = rows.row[:, SparseCol.TAIL].to(compute)
    p_tail = tail.exp()
    kl = _kl_terms(p, lp, s.log_q(idx))
    # Q_tail as a sum over the columns outside K (never 1 - sum_K q_j, which cancels): first
    # relative to the row max; rows where that sum is tiny are redone against the tail's own max
    e_out = s.e.scatter(1, idx, 0.0)
    s_out = e_out.sum(-1)
    log_q_tail = torch.log(s_out) - s.log_s
    share_exact = None  # (rows, q_v / Q_tail outside K on those rows)
    tiny = (s_out < TINY) & (p_tail > 0)
    compact = _compact(s.e.device)
    if not compact or bool(tiny.any()):
        r = tiny.nonzero()[:, 0] if compact else slice(None)
        zt_out = (s.zs[r] * s.k).scatter(1, idx[r], float("-inf"))
        lse_out = torch.logsumexp(zt_out, -1)
        exact = lse_out - s.log_s[r]
        if compact:
            log_q_tail = log_q_tail.index_copy(0, r, exact)
        else:
            log_q_tail = torch.where(tiny, exact, log_q_tail)
        share_exact = (r, torch.exp(zt_out - lse_out[:, None]), tiny[r])
    kl = kl + torch.where(p_tail == 0, 0.0, p_tail * (tail - log_q_tail))
    # the tail mass spreads over the columns outside K in proportion to the student
    spread = (p_tail > 0) & (s_out > 0)

    def sub_target(g, c):
        f = torch.where(spread & ~tiny, c * p_tail / s_out, 0.0)
        g.addcmul_(e_out, f[:, None], value=-1.0)
        if share_exact is not None:
            r, share, on = share_exact
            f_r = torch.where(on & (p_tail[r] > 0), (c * p_tail)[r], 0.0)
            f_r = torch.where(torch.isfinite(share).all(-1), f_r, 0.0)  # Q_tail = 0: no spread
            g[r] = g[r] - torch.nan_to_num(share, nan=0.0) * f_r[:, None]
        g.scatter_add_(1, idx, -(c[:, None] * p))

    return _Teacher(kl, rows.row[:, SparseCol.ARGMAX].long(), rows.row[:, SparseCol.LABEL_LP]
                    .to(compute), sub_target)


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
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        s = _Student(z_all[c0:c1].to(compute), k)  # a copy: the gradient may overwrite logits
        y = labels[c0:c1]
        valid = y != ignore_index
        in_range = (y >= 0) & (y < V)
        yi = torch.where(in_range, y, 0)
        z_y = s.zs.gather(1, yi[:, None])[:, 0]
        log_p_y = z_y - s.log_s1  # log_softmax(z)[y]
        ce = torch.where(in_range, -log_p_y, float("nan"))
        z_arg = s.zs.argmax(-1)
        if old_sparse is not None:
            old = _sparse(SparseRows(*(x[c0:c1] for x in old_sparse)), s, compute)
        else:
            old = _dense(old_all[c0:c1].to(compute), s, yi, need_label)
        new = None
        if new_sparse is not None:
            new = _sparse(SparseRows(*(x[c0:c1] for x in new_sparse)), s, compute)
        elif new_all is not None:
            new = _dense(new_all[c0:c1].to(compute), s, yi, False)

        if mask_mode == MaskMode.GIVEN:
            to_old = mask[c0:c1] != 0
        elif mask_mode == MaskMode.MUSCLE:
            to_old = z_arg != y
        elif mask_mode == MaskMode.OLD_CORRECT:
            to_old = old.argmax == y
        elif mask_mode == MaskMode.TOKEN_LIKELIHOOD:
            to_old = log_p_y < old.label_lp
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
        rows[c0:c1] = torch.where(valid[:, None], out, 0.0)

        if g_all is None:
            continue
        g = torch.zeros_like(s.e)
        if kl_weight != 0:
            # c * (q - p_teacher), c = kl_weight * k * scale on rows whose teacher term is on
            c_old = torch.where(to_old, kl_weight * k * scale_c, 0.0)
            c_new = torch.where(to_old | (new is None), 0.0, kl_weight * k * scale_c)
            g.addcmul_(s.e, ((c_old + c_new) / s.s)[:, None])
            old.sub_target(g, c_old)
            if new is not None:
                new.sub_target(g, c_new)
        if ce_weight != 0:
            c_ce = ce_weight * scale_c
            g.addcmul_(s.e1, (c_ce / s.s1)[:, None])
            g.scatter_add_(1, yi[:, None], (-c_ce).expand(g.shape[0], 1).contiguous())
        g.masked_fill_((valid & ~in_range)[:, None], float("nan"))
        g.masked_fill_(~valid[:, None], 0.0)
        g_all[c0:c1] = g
    if grad is not None and g_all.data_ptr() != grad.data_ptr():
        grad.copy_(g_all.view(B, T, V))
    return rows
