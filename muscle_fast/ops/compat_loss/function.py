"""Autograd and ``torch.library`` registration of the fused compat loss over logits.

A row kernel (README.md) computes the per-row loss, statistics and, in the same launch, the
already-scaled gradient of the reduced loss. The forward saves that gradient; the backward only
multiplies it by the upstream gradient, skipping the pass where that is exactly 1.

``LogitsRows`` is what the orchestrator (``muscle_fast._orchestrator``) runs for
``fused_compat_loss``; ``ops/linear_compat_loss`` has the same three methods over hidden states.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .backends import backend
from .contract import (
    N_STATS, KernelOptions, MaskMode, SparseRows, Stat, as_rows_3d, is_sparse, sparse_rows,
)
from .reference import CompatStats, compat_loss_reference


def sparse_kwargs(old_idx, old_lp, old_row, new_idx, new_lp, new_row) -> dict:
    """The row launcher's ``old_sparse=`` / ``new_sparse=`` from the custom ops' flat tensors
    (none at all for dense teachers: launchers without sparse support take those calls)."""
    old = None if old_idx is None else SparseRows(old_idx, old_lp, old_row)
    new = None if new_idx is None else SparseRows(new_idx, new_lp, new_row)
    return {} if old is None and new is None else {"old_sparse": old, "new_sparse": new}


def flat_sparse(rows: Optional[SparseRows]) -> tuple:
    """(idx, lp, row) of a teacher's ``SparseRows``, (None, None, None) for a dense teacher."""
    return (None, None, None) if rows is None else tuple(rows)


@torch.library.custom_op("muscle_fast::compat_loss_rows", mutates_args=())
def compat_loss_rows(
    logits: Tensor, labels: Tensor, old_logits: Optional[Tensor], new_logits: Optional[Tensor],
    old_idx: Optional[Tensor], old_lp: Optional[Tensor], old_row: Optional[Tensor],
    new_idx: Optional[Tensor], new_lp: Optional[Tensor], new_row: Optional[Tensor],
    mask: Optional[Tensor], scale: Tensor, impl: str, mask_mode: int, inv_temperature: float,
    kl_weight: float, ce_weight: float, ignore_index: int, old_label_logprob: bool, with_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """Row stats [B*T, N_STATS] and, when ``with_grad``, the gradient (else an empty tensor).
    A sparse teacher is its (idx, lp, row) in place of its logits (README.md)."""
    grad = (torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if with_grad
            else None)
    rows = backend(impl).rows(
        logits, labels, old_logits, new_logits, mask, grad, scale,
        mask_mode=mask_mode, inv_temperature=inv_temperature, kl_weight=kl_weight,
        ce_weight=ce_weight, ignore_index=ignore_index, old_label_logprob=old_label_logprob,
        **sparse_kwargs(old_idx, old_lp, old_row, new_idx, new_lp, new_row),
    )
    return rows, grad if grad is not None else logits.new_empty((0,))


@compat_loss_rows.register_fake
def _(logits, labels, old_logits, new_logits, old_idx, old_lp, old_row, new_idx, new_lp, new_row,
      mask, scale, impl, mask_mode, inv_temperature, kl_weight, ce_weight, ignore_index,
      old_label_logprob, with_grad):
    rows = logits.new_empty((labels.numel(), N_STATS), dtype=torch.float32)
    return rows, logits.new_empty(logits.shape if with_grad else (0,))


@torch.library.custom_op("muscle_fast::compat_loss_rows_inplace", mutates_args=("logits",))
def compat_loss_rows_inplace(
    logits: Tensor, labels: Tensor, old_logits: Optional[Tensor], new_logits: Optional[Tensor],
    old_idx: Optional[Tensor], old_lp: Optional[Tensor], old_row: Optional[Tensor],
    new_idx: Optional[Tensor], new_lp: Optional[Tensor], new_row: Optional[Tensor],
    mask: Optional[Tensor], scale: Tensor, impl: str, mask_mode: int, inv_temperature: float,
    kl_weight: float, ce_weight: float, ignore_index: int,
) -> Tensor:
    """Row stats; the gradient overwrites ``logits``."""
    return backend(impl).rows(
        logits, labels, old_logits, new_logits, mask, logits, scale,
        mask_mode=mask_mode, inv_temperature=inv_temperature, kl_weight=kl_weight,
        ce_weight=ce_weight, ignore_index=ignore_index, old_label_logprob=False,
        **sparse_kwargs(old_idx, old_lp, old_row, new_idx, new_lp, new_row),
    )


@compat_loss_rows_inplace.register_fake
def _(logits, labels, *args):
    return logits.new_empty((labels.numel(), N_STATS), dtype=torch.float32)


@torch.library.custom_op("muscle_fast::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: Tensor, grad_output: Tensor, impl: str) -> None:
    """grad *= grad_output (0-dim, or one value per row), with no work where it is exactly 1."""
    backend(impl).scale(grad, grad_output)


@scale_grad_.register_fake
def _(grad, grad_output, impl):
    return None


def row_pass(impl: str, vocab_parallel, logits: Tensor, labels: Tensor,
             old_logits: Optional[Tensor], new_logits: Optional[Tensor], mask: Optional[Tensor],
             scale: Tensor, kopts: KernelOptions, grad_mode: str = "none",
             old_label_logprob: bool = False, old_sparse: Optional[SparseRows] = None,
             new_sparse: Optional[SparseRows] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """One launch of the row kernel over [B, T, V] logits: ``(row stats, gradient or None)``.

    ``grad_mode``: ``"none"``, ``"new"`` (a fresh gradient buffer) or ``"inplace"`` (the gradient
    overwrites ``logits``). A sparse teacher comes as ``old_sparse`` / ``new_sparse`` with its
    logits None. The single place that chooses between the ``torch.library`` op (one device:
    traceable by ``torch.compile``) and ``vocab_parallel``'s launcher, whose collectives cannot
    go through a custom op (and which takes no sparse teacher: the orchestrator refuses that).
    """
    sparse = flat_sparse(old_sparse) + flat_sparse(new_sparse)
    if vocab_parallel is not None:
        if grad_mode == "new":
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        else:
            grad = logits if grad_mode == "inplace" else None
        rows = vocab_parallel(logits, labels, old_logits, new_logits, mask, grad, scale,
                              **kopts.kwargs(old_label_logprob))
        return rows, grad
    # Under torch.compile the in-place variant would be functionalised into a copy anyway.
    if grad_mode == "inplace" and not torch.compiler.is_compiling():
        rows = torch.ops.muscle_fast.compat_loss_rows_inplace(
            logits, labels, old_logits, new_logits, *sparse, mask, scale, impl, *kopts)
        return rows, logits
    rows, grad = torch.ops.muscle_fast.compat_loss_rows(
        logits, labels, old_logits, new_logits, *sparse, mask, scale, impl, *kopts,
        old_label_logprob, grad_mode != "none")
    return rows, grad if grad_mode != "none" else None


def reduce_rows(rows: Tensor, scale: Tensor, reduction: str) -> Tensor:
    """The reduced loss from the row stats: ``"none"`` [N], ``"sum"``, ``"mean"`` (times scale)."""
    loss = rows[:, Stat.LOSS]
    if reduction == "none":
        return loss.clone()
    return loss.sum() if reduction == "sum" else loss.sum() * scale


class CompatLossFunction(torch.autograd.Function):
    """Reduced loss and row stats from a fused row kernel; the backward reuses its gradient."""

    @staticmethod
    def forward(ctx, logits, labels, old_logits, new_logits, mask, scale, impl, vocab_parallel,
                kopts, reduction, inplace, old_sparse, new_sparse):
        with_grad = ctx.needs_input_grad[0]
        grad_mode = ("inplace" if inplace else "new") if with_grad else "none"
        rows, grad = row_pass(impl, vocab_parallel, logits, labels, old_logits, new_logits, mask,
                              scale, kopts, grad_mode, old_sparse=old_sparse,
                              new_sparse=new_sparse)
        loss = reduce_rows(rows, scale, reduction)
        if with_grad:
            ctx.save_for_backward(grad)
        ctx.impl = impl
        ctx.mark_non_differentiable(rows)
        return loss, rows

    @staticmethod
    def backward(ctx, grad_loss, grad_rows):
        # A second backward through the same graph (retain_graph=True) would reuse a gradient
        # already scaled in place: scale_grad_ bumps its version, so autograd refuses it.
        (grad,) = ctx.saved_tensors
        torch.ops.muscle_fast.scale_grad_(grad, grad_loss, ctx.impl)
        return (grad,) + (None,) * 12


def stats_from_rows(rows: Tensor, n_valid: Tensor, has_new: bool) -> CompatStats:
    """Means over valid tokens from the row stats (ignored rows hold zeros), no host sync."""
    means = rows.sum(0) / n_valid.clamp(min=1)
    return CompatStats(
        n_valid=n_valid, frac_to_old=means[Stat.TO_OLD], acc_student=means[Stat.HIT_STUDENT],
        acc_old=means[Stat.HIT_OLD], acc_new=means[Stat.HIT_NEW] if has_new else None,
        kl_old=means[Stat.KL_OLD], kl_new=means[Stat.KL_NEW] if has_new else None,
        ce=means[Stat.CE],
    )


def reference_loss(logits: Tensor, old_logits, new_logits, opts, return_stats: bool):
    """``impl="torch"``: the reference in the logits' dtype (float32 compute below float64), its
    stats as float32 like the fused backends'. ``opts``: the checked options of the call. A
    teacher is its logits or a ``SparseTeacher``."""
    out = compat_loss_reference(
        logits, opts.labels.view(opts.lead), old_logits, new_logits,
        mask=opts.mask_name if opts.mask is None else opts.mask, temperature=opts.temperature,
        kl_weight=opts.kernel.kl_weight, ce_weight=opts.kernel.ce_weight,
        ignore_index=opts.kernel.ignore_index, reduction=opts.reduction,
        num_items=opts.num_items, sequence_ids=opts.sequence_ids, return_stats=return_stats)
    if not return_stats:
        return out
    loss, stats = out
    if logits.dtype != torch.float64:
        for name, value in vars(stats).items():
            if value is not None:
                setattr(stats, name, value.float())
    return loss, stats


def _dense_or_sparse(teacher) -> Tuple[Optional[Tensor], Optional[SparseRows]]:
    """(logits as [B, T, V], None) for a dense teacher, (None, SparseRows) for a sparse one."""
    if is_sparse(teacher):
        return None, sparse_rows(teacher)
    return as_rows_3d(teacher), None


class LogitsRows:
    """The rows of ``fused_compat_loss``: [B, T, V] views of the student and teacher logits (a
    ``SparseTeacher`` becomes its ``SparseRows``)."""

    def __init__(self, logits: Tensor, old_logits, new_logits, inplace: bool):
        self.logits, self.old_logits, self.new_logits = logits, old_logits, new_logits
        self.sparse = is_sparse(old_logits) or is_sparse(new_logits)
        self.z3 = as_rows_3d(logits)
        self.old3, self.old_sp = _dense_or_sparse(old_logits)
        self.new3, self.new_sp = _dense_or_sparse(new_logits)
        self.inplace = bool(inplace)

    def label_logprobs(self, impl, vocab_parallel, opts) -> Tensor:
        """Row stats of a launch without gradient that fills ``Stat.CE`` and ``Stat.OLD_LOGP``
        (the student's and the old model's log p(y)), for the sequence-likelihood mask."""
        kopts = opts.kernel._replace(mask_mode=MaskMode.ALL_OLD, kl_weight=0.0, ce_weight=0.0)
        with torch.no_grad():
            rows, _ = row_pass(impl, vocab_parallel, self.z3.detach(), opts.labels, self.old3,
                               None, None, opts.scale, kopts, "none", old_label_logprob=True,
                               old_sparse=self.old_sp)
        return rows

    def loss(self, impl, vocab_parallel, opts, kopts: KernelOptions, mask: Optional[Tensor]):
        return CompatLossFunction.apply(
            self.z3, opts.labels, self.old3, self.new3, mask, opts.scale, impl, vocab_parallel,
            kopts, opts.reduction, self.inplace, self.old_sp, self.new_sp)

    def reference(self, opts, return_stats: bool):
        return reference_loss(self.logits, self.old_logits, self.new_logits, opts, return_stats)
