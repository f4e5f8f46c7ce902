"""Vocabulary-parallel compat loss: each rank holds a slice of the vocabulary columns.

Every row quantity of the loss (README.md beside this file) is a max, an argmax or a sum over the
vocabulary, so it combines exactly across slices once every rank rescales its sums to the global
max. Per call (one launch of each kernel on every rank):

1. the *partials kernel* reads this rank's slice of the student and teacher rows once and writes
   15 float32 partial statistics per row (``compat_partials_<backend>``, contract in README.md);
2. three all-reduces on O(N) tensors: MAX of the row maxima; then, concurrently, SUM of the
   rescaled sums (and label logits) and MIN of the argmax candidates (the lowest global index
   among the slices holding the global max: torch.argmax's tie rule);
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
from torch import Tensor

from .reference import sequence_likelihood_mask  # noqa: F401  (re-exported for callers)

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
