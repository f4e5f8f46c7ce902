"""The PyTorch backend's kernels: the vocabulary-parallel pair and the gradient scaling.

Readable, float32 or float64, any device: the oracle the fused partials and grad-rows kernels are
tested against (contract: README.md beside this file, "Vocabulary parallel").
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .contract import N_PARTIALS, SEL_IGNORED, SEL_NEW, SEL_OLD, Partial as P


def _stream(x: Tensor, k: float):
    """Row max, first argmax, the reference the sums are taken against, exp((x - ref) k)."""
    m = x.max(-1).values
    ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    return m, x.argmax(-1), ref, torch.exp((x - ref[:, None]) * k)


def compat_partials_torch(
    logits: Tensor, labels: Tensor, old_logits: Tensor, new_logits: Optional[Tensor], *,
    inv_temperature: float, ignore_index: int, old_at_one: bool,
) -> Tensor:
    """Partial statistics [B*T, N_PARTIALS] of this rank's vocabulary slice (README.md)."""
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
    z_gap = z - zr[:, None]
    cols[P.Z_MAX], cols[P.Z_ARG], cols[P.Z_ST] = zm, za.to(compute), ez.sum(-1)
    cols[P.Z_S1] = torch.exp(z - zr[:, None]).sum(-1)
    cols[P.Z_Y] = at_label(z)
    teachers = ((old_logits, (P.O_MAX, P.O_ARG, P.O_S, P.O_A), old_at_one),
                (new_logits, (P.W_MAX, P.W_ARG, P.W_S, P.W_A), False))
    for x, (c_max, c_arg, c_s, c_a), at_one in teachers:
        if x is None:
            continue
        t = x.reshape(-1, V).to(compute)
        tm, ta, tr, et = _stream(t, k)
        cols[c_max], cols[c_arg], cols[c_s] = tm, ta.to(compute), et.sum(-1)
        # differences to the maxima only; p_t == 0 terms are 0, also where the student is -inf
        terms = et * ((t - tr[:, None]) - z_gap) * k
        cols[c_a] = torch.where(et == 0, torch.zeros_like(et), terms).sum(-1)
        if at_one:
            cols[P.O_S1] = torch.exp(t - tr[:, None]).sum(-1)
            cols[P.O_Y] = at_label(t)
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
    # the columns in RowConst order
    zref, s_t, s_1, tref, s_tt, c_kl, c_ce, sel = (c[:, None] for c in consts.unbind(1))
    g = torch.zeros_like(z)
    if has_kl:
        ninf = torch.full_like(z, float("-inf"))
        t = torch.where(sel == SEL_OLD, old_logits.reshape(-1, V).to(compute), ninf)
        if new_logits is not None:
            t = torch.where(sel == SEL_NEW, new_logits.reshape(-1, V).to(compute), t)
        p_t = torch.exp((t - tref) * k) / s_tt
        g = g + c_kl * (torch.exp((z - zref) * k) / s_t - p_t)
    if has_ce:
        cols = torch.arange(V, device=z.device)
        onehot = (cols[None, :] == labels.reshape(-1, 1)).to(compute)
        g = g + c_ce * (torch.exp(z - zref) / s_1 - onehot)
    g = torch.where(sel == SEL_IGNORED, torch.zeros_like(g), g)
    grad.copy_(g.reshape(B, T, V))


def scale_rows_torch(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output in place (0-dim, or one value per row of [B, T, V])."""
    # reading a CPU tensor is no device sync: skip the pass where the factor is exactly 1
    if grad_output.device.type == "cpu" and bool((grad_output == 1).all()):
        return
    go = grad_output.to(device=grad.device, dtype=torch.float32)
    grad.mul_(go.reshape(grad.shape[:-1] + (1,)) if go.dim() > 0 else go)
