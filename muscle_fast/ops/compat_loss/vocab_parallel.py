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
``compat_partials_torch`` and ``compat_grad_rows_torch`` are the PyTorch backend of the two kernels
(readable, float32 or float64) and the oracle the fused kernels are tested against.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

N_PARTIALS = 15
N_ROW_CONSTS = 8
# columns of the partials tensor
Z_MAX, Z_ARG, Z_ST, Z_S1, Z_Y = 0, 1, 2, 3, 4
O_MAX, O_ARG, O_S, O_A, O_S1, O_Y = 5, 6, 7, 8, 9, 10
W_MAX, W_ARG, W_S, W_A = 11, 12, 13, 14
# the argmax columns hold local indices as float32: exact below 2**24
MAX_VOCAB = 1 << 24
# labels handed to the kernels: a valid token whose label another rank owns, and an ignored token
NOT_OWNED, IGNORED = -1, -2


# ------------------------------------------------------------------ the PyTorch backend of the kernels


def _stream(x: Tensor, k: float):
    """Row max, first argmax, the reference the sums are taken against, exp((x - ref) k)."""
    m = x.max(-1).values
    ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    return m, x.argmax(-1), ref, torch.exp((x - ref[:, None]) * k)


def compat_partials_torch(
    logits: Tensor, labels: Tensor, old_logits: Tensor, new_logits: Optional[Tensor], *,
    inv_temperature: float, ignore_index: int, old_at_one: bool,
) -> Tensor:
    """Partial statistics [B*T, 15] of this rank's vocabulary slice (README.md, vocabulary parallel)."""
    B, T, V = logits.shape
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    k = float(inv_temperature)
    z = logits.reshape(-1, V).to(compute)
    y = labels.reshape(-1)
    active = y != ignore_index
    own = active & (y >= 0) & (y < V)
    y_idx = torch.where(own, y, torch.zeros_like(y))[:, None]
    zero = torch.zeros(y.shape, dtype=compute, device=z.device)

    def at_label(x):
        return torch.where(own, x.gather(1, y_idx).squeeze(1), zero)

    cols: List[Tensor] = [zero] * N_PARTIALS
    zm, za, zr, ez = _stream(z, k)
    cols[Z_MAX], cols[Z_ARG], cols[Z_ST] = zm, za.to(compute), ez.sum(-1)
    cols[Z_S1] = torch.exp(z - zr[:, None]).sum(-1)
    cols[Z_Y] = at_label(z)
    for x, first, at_one in ((old_logits, O_MAX, old_at_one), (new_logits, W_MAX, False)):
        if x is None:
            continue
        t = x.reshape(-1, V).to(compute)
        tm, ta, tr, et = _stream(t, k)
        cols[first], cols[first + 1], cols[first + 2] = tm, ta.to(compute), et.sum(-1)
        # p_t == 0 terms are 0, also where the student is -inf there
        cols[first + 3] = torch.where(et == 0, torch.zeros_like(et), et * (t - z) * k).sum(-1)
        if at_one:
            cols[O_S1] = torch.exp(t - tr[:, None]).sum(-1)
            cols[O_Y] = at_label(t)
    out = torch.stack(cols, 1)
    return torch.where(active[:, None], out, torch.zeros_like(out))


def compat_grad_rows_torch(
    logits: Tensor, labels: Tensor, old_logits: Tensor, new_logits: Optional[Tensor],
    grad: Tensor, consts: Tensor, *, inv_temperature: float, has_kl: bool, has_ce: bool,
) -> None:
    """grad[i] = d loss_i / d logits[i] on this slice, from the row constants (README.md)."""
    B, T, V = logits.shape
    compute = consts.dtype
    k = float(inv_temperature)
    z = logits.reshape(-1, V).to(compute)
    zref, s_t, s_1, tref, s_tt, c_kl, c_ce, sel = (c[:, None] for c in consts.unbind(1))
    g = torch.zeros_like(z)
    if has_kl:
        ninf = torch.full_like(z, float("-inf"))
        t = torch.where(sel == 1, old_logits.reshape(-1, V).to(compute), ninf)
        if new_logits is not None:
            t = torch.where(sel == 2, new_logits.reshape(-1, V).to(compute), t)
        p_t = torch.exp((t - tref) * k) / s_tt
        g = g + c_kl * (torch.exp((z - zref) * k) / s_t - p_t)
    if has_ce:
        cols = torch.arange(V, device=z.device)
        onehot = (cols[None, :] == labels.reshape(-1, 1)).to(compute)
        g = g + c_ce * (torch.exp(z - zref) / s_1 - onehot)
    g = torch.where(sel == -1, torch.zeros_like(g), g)
    grad.copy_(g.reshape(B, T, V))


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
        from ... import _dispatch

        self.partials, self.grad_rows = _dispatch.vocab_parallel_kernels(impl)
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
        old_at_one = bool(old_label_logprob or mask_mode == 3)
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
        max_cols = [Z_MAX, O_MAX] + ([W_MAX] if has_new else [])
        local_max = p[:, max_cols]
        # 1. the global maxima
        gmax = local_max.clone()
        self._all_reduce(gmax, "MAX")
        # 2. argmax candidates (lowest global index among the slices holding the maximum) and the
        #    sums rescaled from this slice's reference to the global one; reduced concurrently
        # int32 is exact: vocab_shards keeps the vocabulary below 2**24
        arg = p[:, [c + 1 for c in max_cols]].to(torch.int32) + self.vocab_start
        cand = torch.where(local_max == gmax, arg, torch.full_like(arg, torch.iinfo(torch.int32).max))
        ref = _safe(gmax)
        f_k = torch.exp((local_max - ref) * k)  # 0 for a slice whose maximum is -inf
        f_1 = torch.exp(local_max - ref)
        cols = [p[:, Z_ST] * f_k[:, 0], p[:, Z_S1] * f_1[:, 0], p[:, Z_Y], owned.to(p.dtype),
                p[:, O_S] * f_k[:, 1], p[:, O_A] * f_k[:, 1]]
        if old_at_one:
            cols += [p[:, O_S1] * f_1[:, 1], p[:, O_Y]]
        if has_new:
            cols += [p[:, W_S] * f_k[:, 2], p[:, W_A] * f_k[:, 2]]
        sums = torch.stack(cols, 1)
        works = [self._all_reduce(sums, "SUM", True), self._all_reduce(cand, "MIN", True)]
        for w in works:
            if w is not None:
                w.wait()
        return _finalize(sums, cand, ref, labels, valid, has_new, old_at_one, mask_mode, mask,
                         scale, k, kl_weight, ce_weight)


def _finalize(sums, arg, ref, labels, valid, has_new, old_at_one, mask_mode, mask, scale, k,
              kl_weight, ce_weight):
    """Row stats [N, 9] (README.md columns) and gradient row constants [N, 8] from global sums."""
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
    # the same expression, in the same order, as the single-device kernels
    kl_old = (a_o / s_o - (os_ - zs) * k) - log_so + log_st
    kl_new = (a_w / s_w - (ref[:, 2] - zs) * k) - torch.log(s_w) + log_st if has_new else zero.expand_as(kl_old)
    ce = (zs - z_y) + log_s1
    old_logp = (torch.where(y_ok, o_y, nan) - os_) - torch.log(s_o1) if old_at_one else zero.expand_as(ce)
    hit_z, hit_o = arg[:, 0] == labels, arg[:, 1] == labels
    hit_w = arg[:, 2] == labels if has_new else torch.zeros_like(hit_z)
    if mask_mode == 0:
        to_old = mask != 0
    elif mask_mode == 1:
        to_old = ~hit_z
    elif mask_mode == 2:
        to_old = hit_o
    elif mask_mode == 3:
        to_old = (z_y - zs - log_s1) < old_logp
    else:
        to_old = torch.ones_like(valid)
    loss = torch.zeros_like(ce)
    if kl_weight != 0:  # a term whose weight is 0 is left out (0 * inf would be NaN)
        loss = loss + kl_weight * torch.where(to_old, kl_old, kl_new)
    if ce_weight != 0:
        loss = loss + ce_weight * ce
    loss = torch.where(y_ok, loss, nan)
    rows = torch.stack([loss, to_old.to(f), hit_z.to(f), hit_o.to(f), hit_w.to(f), kl_old,
                        kl_new, ce, old_logp], 1)
    rows = torch.where(valid[:, None], rows, zero)

    use_new = ~to_old & has_new
    sel = torch.where(to_old, 1, torch.where(use_new, 2, 0))
    sel = torch.where(valid, sel, -1).to(f)
    one = torch.ones((), dtype=f, device=sums.device)
    tref = torch.where(to_old, os_, ref[:, 2] if has_new else zero)
    s_tt = torch.where(to_old, s_o, s_w if has_new else one)  # 1 where no teacher is selected
    scale = scale.to(f)
    c_kl = torch.where(sel > 0, kl_weight * k * scale, zero) if kl_weight != 0 else zero.expand_as(ce)
    c_ce = (ce_weight * scale).expand_as(ce)
    c_kl = torch.where(y_ok, c_kl, nan)
    c_ce = torch.where(y_ok, c_ce, nan)
    consts = torch.stack([zs, s_t, s_1, tref, s_tt, c_kl, c_ce, sel], 1).contiguous()
    return rows, consts
