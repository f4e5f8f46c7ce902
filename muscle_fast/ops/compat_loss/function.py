"""Autograd and ``torch.library`` registration of the fused compat loss.

A row kernel (README.md) computes the per-row loss, statistics and, in the same launch, the
already-scaled gradient of the reduced loss. The forward saves that gradient; the backward only
multiplies it by the upstream gradient, on the device, skipping rows where that is exactly 1.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _dispatch
from .reference import CompatStats

MASK_MODES = {"muscle": 1, "old_correct": 2, "token_likelihood": 3, "all_old": 4}
MASK_TENSOR = 0


@torch.library.custom_op("muscle_fast::compat_loss_rows", mutates_args=())
def compat_loss_rows(
    logits: Tensor, labels: Tensor, old_logits: Tensor, new_logits: Optional[Tensor],
    mask: Optional[Tensor], scale: Tensor, impl: str, mask_mode: int, inv_temperature: float,
    kl_weight: float, ce_weight: float, ignore_index: int, old_label_logprob: bool, with_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """Row stats [B*T, 9] and, when ``with_grad``, the gradient (else an empty tensor)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if with_grad else None
    rows = _dispatch.launcher(impl)(
        logits, labels, old_logits, new_logits, mask, grad, scale,
        mask_mode=mask_mode, inv_temperature=inv_temperature, kl_weight=kl_weight,
        ce_weight=ce_weight, ignore_index=ignore_index, old_label_logprob=old_label_logprob,
    )
    return rows, grad if grad is not None else logits.new_empty((0,))


@compat_loss_rows.register_fake
def _(logits, labels, old_logits, new_logits, mask, scale, impl, mask_mode, inv_temperature,
      kl_weight, ce_weight, ignore_index, old_label_logprob, with_grad):
    rows = logits.new_empty((labels.numel(), 9), dtype=torch.float32)
    return rows, logits.new_empty(logits.shape if with_grad else (0,))


@torch.library.custom_op("muscle_fast::compat_loss_rows_inplace", mutates_args=("logits",))
def compat_loss_rows_inplace(
    logits: Tensor, labels: Tensor, old_logits: Tensor, new_logits: Optional[Tensor],
    mask: Optional[Tensor], scale: Tensor, impl: str, mask_mode: int, inv_temperature: float,
    kl_weight: float, ce_weight: float, ignore_index: int,
) -> Tensor:
    """Row stats; the gradient overwrites ``logits``."""
    return _dispatch.launcher(impl)(
        logits, labels, old_logits, new_logits, mask, logits, scale,
        mask_mode=mask_mode, inv_temperature=inv_temperature, kl_weight=kl_weight,
        ce_weight=ce_weight, ignore_index=ignore_index, old_label_logprob=False,
    )


@compat_loss_rows_inplace.register_fake
def _(logits, labels, *args):
    return logits.new_empty((labels.numel(), 9), dtype=torch.float32)


@torch.library.custom_op("muscle_fast::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output (0-dim, or one value per row), with no work where it is exactly 1."""
    _dispatch.grad_scaler(grad.device)(grad, grad_output)


@scale_grad_.register_fake
def _(grad, grad_output):
    return None


class CompatLossFunction(torch.autograd.Function):
    """Reduced loss and row stats from a fused row kernel; the backward reuses its gradient."""

    @staticmethod
    def forward(ctx, logits, labels, old_logits, new_logits, mask, scale, impl, mask_mode,
                inv_temperature, kl_weight, ce_weight, ignore_index, reduction, inplace,
                launch=None):
        with_grad = ctx.needs_input_grad[0]
        if launch is not None:
            # a launcher object with the row contract (vocab_parallel.VocabParallel): its
            # collectives cannot go through a torch.library op
            grad = ((logits if inplace else torch.empty(logits.shape, dtype=logits.dtype,
                                                       device=logits.device))
                    if with_grad else None)
            rows = launch(logits, labels, old_logits, new_logits, mask, grad, scale,
                          mask_mode=mask_mode, inv_temperature=inv_temperature,
                          kl_weight=kl_weight, ce_weight=ce_weight, ignore_index=ignore_index,
                          old_label_logprob=False)
        # Under torch.compile the in-place variant would be functionalised into a copy anyway.
        elif with_grad and inplace and not torch.compiler.is_compiling():
            rows = torch.ops.muscle_fast.compat_loss_rows_inplace(
                logits, labels, old_logits, new_logits, mask, scale, impl, mask_mode,
                inv_temperature, kl_weight, ce_weight, ignore_index)
            grad = logits
        else:
            rows, grad = torch.ops.muscle_fast.compat_loss_rows(
                logits, labels, old_logits, new_logits, mask, scale, impl, mask_mode,
                inv_temperature, kl_weight, ce_weight, ignore_index, False, with_grad)
        if reduction == "none":
            loss = rows[:, 0].reshape(logits.shape[:-1]).clone()
        elif reduction == "sum":
            loss = rows[:, 0].sum()
        else:
            loss = rows[:, 0].sum() * scale
        if with_grad:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(rows)
        return loss, rows

    @staticmethod
    def backward(ctx, grad_loss, grad_rows):
        # A second backward through the same graph (retain_graph=True) would reuse a gradient
        # already scaled in place: scale_grad_ bumps its version, so autograd refuses it.
        (grad,) = ctx.saved_tensors
        torch.ops.muscle_fast.scale_grad_(grad, grad_loss)
        return (grad,) + (None,) * 14


def stats_from_rows(rows: Tensor, n_valid: Tensor, has_new: bool) -> CompatStats:
    """Means over valid tokens from the row stats (ignored rows hold zeros), no host sync."""
    means = rows[:, 1:8].sum(0) / n_valid.clamp(min=1)
    return CompatStats(
        n_valid=n_valid, frac_to_old=means[0], acc_student=means[1], acc_old=means[2],
        acc_new=means[3] if has_new else None, kl_old=means[4],
        kl_new=means[5] if has_new else None, ce=means[6],
    )
