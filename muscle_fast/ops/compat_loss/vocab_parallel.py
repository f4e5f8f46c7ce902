"""Vocabulary-parallel compat loss: each rank holds a slice of the vocabulary columns.

Every row quantity of the loss (README.md beside this file) is a max, an argmax or a sum over the
vocabulary, so it combines exactly across slices once every rank rescales its sums to the global
max. Per call (one launch of each kernel on every rank):

1. the *partials kernel* reads this rank's slice of the student and teacher rows once and writes
   15 float32 partial statistics per row (``compat_partials_<backend>``, contract in README.md);
2. three all-reduces on O(N) tensors: MAX of the row maxima; then, concurrently, SUM of the
   rescaled sums, label logits and label-owner counts, and MIN of the argmax candidates (the
   lowest global index among the slices holding the global max: torch.argmax's tie rule);
3. the global row statistics, the mask and the loss, in PyTorch on [N] vectors (this file);
4. the *gradient kernel* writes this rank's slice of the gradient from 8 float32 row constants
   (``compat_grad_rows_<backend>``), reading the student and the one selected teacher again.

``VocabParallel`` bundles 1-4 behind the same row contract as ``compat_loss_<backend>``, with
global labels, so the public functions and the fused-linear chunk loop use it unchanged.
The kernels come from the backend table (``backends.py``); the PyTorch pair is in
``torch_kernels.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import backend
from .contract import (
    SEL_IGNORED, SEL_NEW, SEL_NONE, SEL_OLD, MaskMode, Partial as P, RowConst, Stat,
)
# the argmax columns hold local indices as float32: exact below 2**24
MAX_VOCAB = 1 << 24
# labels handed to the kernels: a valid token whose label another rank owns, and an ignored token
NOT_OWNED, IGNORED = -1, -2


# ------------------------------------------------------------------ combination across ranks


def _group_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def vocab_shards(group, vocab_local: int, vocab_start: Optional[int], device) -> Tuple[int, int]:
    """(this rank's vocab_start, the global vocabulary) from every rank's (vocab_start, V_local).

    One all_gather of 2 int64 per rank and a host sync. ``vocab_start=None`` on every rank: the
    slices are contiguous in group rank order. Given on every rank: the slices must tile
    ``[0, V)`` without gap or overlap. The answer is the same on every rank, so a bad layout
    raises the same ValueError everywhere (no rank is left waiting in a collective).
    """
    mine = torch.tensor([-1 if vocab_start is None else int(vocab_start), vocab_local],
                        dtype=torch.int64, device=device)
    world = _group_size(group)
    if world == 1:
        table = [mine.tolist()]
    else:
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        table = torch.stack(parts).tolist()
    given = [start != -1 for start, _ in table]
    sizes = [size for _, size in table]
    if any(given) and not all(given):
        raise ValueError("vocab_start must be given on every rank of process_group or on none; "
                         f"got (vocab_start, V_local) per rank: {table}")
    total = sum(sizes)
    if not any(given):
        rank = 0 if world == 1 else dist.get_rank(group)
        start = sum(sizes[:rank])
    else:
        start = int(vocab_start)
        end = 0
        for s, size in sorted(table):
            if s != end:
                raise ValueError("the vocabulary slices [vocab_start, vocab_start + V_local) of the "
                                 f"ranks must tile [0, {total}) in order; got (vocab_start, "
                                 f"V_local) per rank: {table}")
            end = s + size
    if total >= MAX_VOCAB:
        raise ValueError(f"vocabulary parallel loss supports vocabularies below 2**24, got {total}")
    return start, total


def _safe(m: Tensor) -> Tensor:
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


class VocabParallel:
    """A row-kernel launcher (README.md row contract, *global* labels) over a vocabulary split.

    ``VocabParallel(impl, group, vocab_start)(logits, labels, ...)`` with this rank's slice of the
    logits returns the row statistics of the whole vocabulary (equal on every rank) and writes this
    rank's slice of the gradient. Every rank of ``group`` must make the same calls in the same
    order, with the same labels, mask and scale.
    """

    def __init__(self, impl: str, group, vocab_start: int):
        kernels = backend(impl)
        self.partials, self.grad_rows = kernels.partials, kernels.grad_rows
        self.group, self.vocab_start = group, int(vocab_start)
        self.world = _group_size(group)

    def _all_reduce(self, x: Tensor, op: str, async_op: bool = False):
        """In place over the group (op: "MAX", "SUM", "MIN"); nothing to do on one rank."""
        if self.world == 1:
            return None
        return dist.all_reduce(x, op=getattr(dist.ReduceOp, op), group=self.group,
                               async_op=async_op)

    def __call__(self, logits, labels, old_logits, new_logits, mask, grad, scale, *, mask_mode,
                 inv_temperature, kl_weight, ce_weight, ignore_index, old_label_logprob) -> Tensor:
        V = logits.shape[-1]
        k = float(inv_temperature)
        valid = labels != ignore_index
        rel = labels - self.vocab_start
        owned = valid & (rel >= 0) & (rel < V)
        local = torch.where(owned, rel, torch.full_like(rel, NOT_OWNED))
        local = torch.where(valid, local, torch.full_like(rel, IGNORED)).contiguous()
        old_at_one = bool(old_label_logprob or mask_mode == MaskMode.TOKEN_LIKELIHOOD)
        p = self.partials(logits, local, old_logits, new_logits, inv_temperature=k,
                          ignore_index=IGNORED, old_at_one=old_at_one)
        has_new = new_logits is not None
        rows, consts = self._combine(p, labels, valid, owned, has_new, mask_mode, mask, scale, k,
                                     kl_weight, ce_weight, old_at_one)
        if grad is not None:
            self.grad_rows(logits, local, old_logits, new_logits, grad, consts, inv_temperature=k,
                           has_kl=kl_weight != 0, has_ce=ce_weight != 0)
        return rows

    def _combine(self, p, labels, valid, owned, has_new, mask_mode, mask, scale, k, kl_weight,
                 ce_weight, old_at_one):
        max_cols = [P.Z_MAX, P.O_MAX] + ([P.W_MAX] if has_new else [])
        local_max = p[:, max_cols]
        # 1. the global maxima
        gmax = local_max.clone()
        self._all_reduce(gmax, "MAX")
        # 2. argmax candidates (lowest global index among the slices holding the maximum) and the
        #    sums rescaled from this slice's reference to the global one; reduced concurrently
        # int32 is exact: vocab_shards keeps the vocabulary below 2**24
        arg_cols = [P.Z_ARG, P.O_ARG] + ([P.W_ARG] if has_new else [])
        arg = p[:, arg_cols].to(torch.int32) + self.vocab_start
        cand = torch.where(local_max == gmax, arg, torch.full_like(arg, torch.iinfo(torch.int32).max))
        ref = _safe(gmax)
        f_k = torch.exp((local_max - ref) * k)  # 0 for a slice whose maximum is -inf
        f_1 = torch.exp(local_max - ref)
        # the KL partials move from this slice's references to the global ones: every term's
        # (t - tref) - (z - zref) shifts by the same (tref_local - tref) - (zref_local - zref)
        shift = (_safe(local_max) - ref) * k
        shift = shift[:, 1:] - shift[:, :1]

        def kl_partial(a, s, j):
            moved = f_k[:, j] * (a + s * shift[:, j - 1])
            return torch.where(f_k[:, j] == 0, torch.zeros_like(moved), moved)

        cols = [p[:, P.Z_ST] * f_k[:, 0], p[:, P.Z_S1] * f_1[:, 0], p[:, P.Z_Y], owned.to(p.dtype),
                p[:, P.O_S] * f_k[:, 1], kl_partial(p[:, P.O_A], p[:, P.O_S], 1)]
        if old_at_one:
            cols += [p[:, P.O_S1] * f_1[:, 1], p[:, P.O_Y]]
        if has_new:
            cols += [p[:, P.W_S] * f_k[:, 2], kl_partial(p[:, P.W_A], p[:, P.W_S], 2)]
        sums = torch.stack(cols, 1)
        works = [self._all_reduce(sums, "SUM", True), self._all_reduce(cand, "MIN", True)]
        for w in works:
            if w is not None:
                w.wait()
        return _finalize(sums, cand, ref, labels, valid, has_new, old_at_one, mask_mode, mask,
                         scale, k, kl_weight, ce_weight)


def _finalize(sums, arg, ref, labels, valid, has_new, old_at_one, mask_mode, mask, scale, k,
              kl_weight, ce_weight):
    """Row stats [N, N_STATS] and gradient row constants [N, N_ROW_CONSTS] from global sums."""
    f = sums.dtype
    nan = torch.full((), float("nan"), dtype=f, device=sums.device)
    zero = torch.zeros((), dtype=f, device=sums.device)
    it = iter(sums.unbind(1))
    s_t, s_1, z_y, n_own, s_o, a_o = (next(it) for _ in range(6))
    s_o1, o_y = (next(it), next(it)) if old_at_one else (None, None)
    s_w, a_w = (next(it), next(it)) if has_new else (None, None)
    zs, os_ = ref[:, 0], ref[:, 1]
    # exactly one rank owns an in-range label; 0 (out of range) or 2 (overlapping slices) is NaN
    y_ok = n_own == 1
    z_y = torch.where(y_ok, z_y, nan)
    log_st, log_s1, log_so = torch.log(s_t), torch.log(s_1), torch.log(s_o)
    # the same expression, in the same order, as the single-device kernels: O(1) terms only
    kl_old = a_o / s_o - log_so + log_st
    kl_new = a_w / s_w - torch.log(s_w) + log_st if has_new else zero.expand_as(kl_old)
    ce = (zs - z_y) + log_s1
    old_logp = (torch.where(y_ok, o_y, nan) - os_) - torch.log(s_o1) if old_at_one else zero.expand_as(ce)
    hit_z, hit_o = arg[:, 0] == labels, arg[:, 1] == labels
    hit_w = arg[:, 2] == labels if has_new else torch.zeros_like(hit_z)
    if mask_mode == MaskMode.GIVEN:
        to_old = mask != 0
    elif mask_mode == MaskMode.MUSCLE:
        to_old = ~hit_z
    elif mask_mode == MaskMode.OLD_CORRECT:
        to_old = hit_o
    elif mask_mode == MaskMode.TOKEN_LIKELIHOOD:
        to_old = (z_y - zs - log_s1) < old_logp
    else:
        to_old = torch.ones_like(valid)
    loss = torch.zeros_like(ce)
    if kl_weight != 0:  # a term whose weight is 0 is left out (0 * inf would be NaN)
        loss = loss + kl_weight * torch.where(to_old, kl_old, kl_new)
    if ce_weight != 0:
        loss = loss + ce_weight * ce
    loss = torch.where(y_ok, loss, nan)
    stats = {Stat.LOSS: loss, Stat.TO_OLD: to_old.to(f), Stat.HIT_STUDENT: hit_z.to(f),
             Stat.HIT_OLD: hit_o.to(f), Stat.HIT_NEW: hit_w.to(f), Stat.KL_OLD: kl_old,
             Stat.KL_NEW: kl_new, Stat.CE: ce, Stat.OLD_LOGP: old_logp}
    rows = torch.stack([stats[c] for c in Stat], 1)
    rows = torch.where(valid[:, None], rows, zero)

    use_new = ~to_old & has_new
    sel = torch.where(to_old, SEL_OLD, torch.where(use_new, SEL_NEW, SEL_NONE))
    sel = torch.where(valid, sel, SEL_IGNORED).to(f)
    one = torch.ones((), dtype=f, device=sums.device)
    tref = torch.where(to_old, os_, ref[:, 2] if has_new else zero)
    s_tt = torch.where(to_old, s_o, s_w if has_new else one)  # 1 where no teacher is selected
    scale = scale.to(f)
    c_kl = torch.where(sel > 0, kl_weight * k * scale, zero) if kl_weight != 0 else zero.expand_as(ce)
    c_ce = (ce_weight * scale).expand_as(ce)
    c_kl = torch.where(y_ok, c_kl, nan)
    c_ce = torch.where(y_ok, c_ce, nan)
    named = {RowConst.ZREF: zs, RowConst.S_T: s_t, RowConst.S_1: s_1, RowConst.TREF: tref,
             RowConst.S_TT: s_tt, RowConst.C_KL: c_kl, RowConst.C_CE: c_ce, RowConst.SEL: sel}
    consts = torch.stack([named[c] for c in RowConst], 1).contiguous()
    return rows, consts
