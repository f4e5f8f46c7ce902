"""Public compat loss: validate the inputs, then the shared orchestrator runs it."""
from __future__ import annotations

import inspect
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import _orchestrator
from ._checks import (
    FLOAT_DTYPES,
    FLOAT_DTYPES_TEXT,
    check_flag,
    check_inplace_target,
    check_options,
    check_stored_options,
    check_teacher_logits,
)
from .ops.compat_loss.function import LogitsRows
from .sparse_teacher import SparseTeacher, check_sparse_teachers
from .ops.compat_loss.reference import CompatStats


def fused_compat_loss(
    logits: Tensor,
    labels: Tensor,
    old_logits: Optional[Tensor] = None,
    new_logits: Optional[Tensor] = None,
    *,
    mask: Union[str, Tensor] = "muscle",
    temperature: float = 2.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: Union[None, int, float, Tensor] = None,
    sequence_ids: Optional[Tensor] = None,
    inplace_backward: bool = False,
    process_group=None,
    vocab_start: Optional[int] = None,
    impl: str = "auto",
    return_stats: bool = False,
    validate: bool = True,
):
    """MUSCLE's masked teacher-student loss, fused over the vocabulary.

    Equals, per token ``i`` (rows of ``logits.flatten(0, -2)``), then reduced over valid tokens::

        ls = log_softmax(logits / T, -1); lo = log_softmax(old_logits / T, -1)
        ln = log_softmax(new_logits / T, -1)
        kl_old = (lo.exp() * (lo - ls)).sum(-1); kl_new = (ln.exp() * (ln - ls)).sum(-1)
        ce = cross_entropy(logits, labels, reduction="none")
        loss_i = kl_weight * where(m, kl_old, kl_new) + ce_weight * ce

    with ``m`` the token mask (``mask=``: ``"muscle"`` aligns token i to the old model where the
    student's argmax misses the label; see docs/SPEC.md section 2 for every mask). Forward and
    gradient run in one fused kernel (Triton on CUDA, C++ on CPU); the backward reuses that
    gradient.

    Args:
        logits: student logits [N, V] or [B, T, V], fp32/bf16/fp16 (fp64: ``impl="torch"``).
        labels: integer ids [N] or [B, T] (int64, int32, ...); ``logits[i]`` predicts
            ``labels[i]`` (callers shift).
        old_logits: frozen logits of the old task model (required by every mask), or a
            :class:`SparseTeacher` (its top-k log-probabilities and a tail bucket: the KL is
            then the exact KL over those k + 1 categories, docs/SPEC.md section 2; built at this
            ``temperature``, and with ``labels=`` for the likelihood masks).
        new_logits: frozen logits of the new task model (required by ``"muscle"``,
            ``"token_likelihood"``, ``"sequence_likelihood"``; optional otherwise, its term is 0),
            or a :class:`SparseTeacher`.
        mask: a mask name, or a bool/0-1 tensor [N] or [B, T] (1 = align to old).
        temperature: T > 0 of the KL terms (the CE is at T = 1). No hidden T**2 factor.
        kl_weight, ce_weight: weights >= 0; a term with weight 0 is left out.
        ignore_index: label of tokens that contribute nothing.
        reduction: ``"mean"`` over valid tokens, ``"sum"`` or ``"none"``.
        num_items: for ``"mean"``, divide by this global token count instead (gradient
            accumulation, data parallel): a number > 0, or a one-element tensor. A count that
            is not finite and > 0 is an error for Python numbers and CPU tensors; a count on a
            GPU is not read (that would be a sync): there it makes the loss and gradient NaN,
            and ``validate=True`` raises for it with the same one sync as the labels.
        sequence_ids: for ``"sequence_likelihood"`` on packed rows: runs of equal ids are sequences.
        inplace_backward: the gradient overwrites ``logits`` (saves one [N, V] buffer). After
            the call ``logits`` holds the gradient, not the logits: ops recorded on ``logits``
            before the call are caught by autograd's version check at backward, but anything
            that reads ``logits`` afterwards (printing it, a second loss on it, an argmax for a
            metric) silently sees the gradient. Use it only when nothing reads the logits after
            the loss. Fused backends only, outside ``torch.compile``. Refused (ValueError), as
            PyTorch refuses in-place ops on them, on every backend: ``logits`` that is a leaf
            requiring grad (an ``nn.Parameter``) or a view of one, and ``logits`` whose
            elements share memory (an ``expand()``ed tensor, overlapping strides).
        process_group: vocabulary parallel (a tensor-parallel lm_head): ``logits``,
            ``old_logits`` and ``new_logits`` hold this rank's columns ``[vocab_start,
            vocab_start + V_local)`` of the vocabulary; ``labels`` are global ids. Every rank of
            the group calls with the same labels, mask and options, and gets the loss and stats
            of the whole vocabulary (equal on every rank, the single-device values up to
            rounding) and its slice of the gradient. Cost per call: 3 all-reduces on
            O(tokens) tensors (MAX of the 3 row maxima; then, concurrently, SUM of 8 rescaled
            partial sums, label logits and label-owner counts, and MIN of 3 int32 argmax
            indices): 4 * 3 + 4 * 8 + 4 * 3 = 56 bytes per token with a new teacher (40
            without; ``"token_likelihood"`` and ``"sequence_likelihood"`` add 8), where
            all-gathering the logits instead would move ``2 * V`` bytes per token and model in
            bf16. ``"sequence_likelihood"`` runs the collectives twice. The kernels read the
            student row twice (statistics, then gradient), like the single-device kernel on rows
            of more than 8192 columns. Under ``torch.compile`` this call runs eagerly (a graph
            break: the collectives are not traced). Sparse teachers are not supported here yet
            (an error).
        vocab_start: this rank's first vocabulary column. None: the slices are contiguous in
            group rank order, found with one all_gather of 16 bytes per rank and a host sync
            (which ``validate=True`` also uses to check that given starts tile the vocabulary).
            Pass it with ``validate=False`` for a call without host sync.
        impl: ``"auto"``, ``"triton"``, ``"native"`` or ``"torch"`` (then ``MUSCLE_FAST_IMPL``).
        return_stats: also return a :class:`CompatStats` computed in the same pass.
        validate: check that labels lie in ``[0, V)`` (one small host sync on GPU). Without it a
            bad label makes its token's loss NaN. Skipped inside ``torch.compile``.

    Returns:
        The loss (float32, 0-dim, or the leading shape for ``"none"``), or ``(loss, stats)``.
        The fused backends compute the gradient in the forward and store it in the logits'
        dtype; the backward multiplies it by the upstream gradient (no work where that is 1).
        For bf16/fp16 logits an upstream factor that is not a power of two therefore rounds the
        gradient twice (PyTorch's own autograd rounds once).

    Shape:
        logits, old_logits, new_logits: [N, V] or [B, T, V]; labels, mask, sequence_ids: [N] or
        [B, T]; the gradient has the shape and dtype of ``logits``.
    """
    # --- checks of types, shapes, devices and options: free, always on ---
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"logits must be {FLOAT_DTYPES_TEXT}, got {logits.dtype}")
    device, vocab, lead = logits.device, logits.shape[-1], logits.shape[:-1]
    if vocab == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    if old_logits is None:
        raise ValueError("old_logits is required: every mask aligns some tokens to the old model")
    for name, t in (("old_logits", old_logits), ("new_logits", new_logits)):
        if t is not None and not isinstance(t, SparseTeacher):  # a sparse one: after the options
            check_teacher_logits(name, t, lead, vocab, device)
    inplace_backward = check_flag("inplace_backward", inplace_backward)
    if inplace_backward:
        check_inplace_target("logits", logits)
    return_stats = check_flag("return_stats", return_stats)
    validate = check_flag("validate", validate)
    opts = check_options(
        labels, lead, device, has_new=new_logits is not None, mask=mask, temperature=temperature,
        kl_weight=kl_weight, ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
        num_items=num_items, sequence_ids=sequence_ids,
        scale_dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    value_checks = check_sparse_teachers(old_logits, new_logits, opts, lead, vocab, device)
    teachers = [t for t in (old_logits, new_logits) if isinstance(t, Tensor)]
    return _orchestrator.run(
        LogitsRows(logits, old_logits, new_logits, inplace_backward), opts, impl=impl,
        device=device, dtype=logits.dtype, teacher_dtypes=[t.dtype for t in teachers],
        vocab=vocab, process_group=process_group, vocab_start=vocab_start, validate=validate,
        return_stats=return_stats, has_new=new_logits is not None, value_checks=value_checks)


class FusedCompatLoss(nn.Module):
    """Module form of :func:`fused_compat_loss`: stores the options, nothing else.

    ``FusedCompatLoss(mask="muscle", temperature=2.0)(logits, labels, old_logits, new_logits)``
    equals ``fused_compat_loss(logits, labels, old_logits, new_logits, mask="muscle",
    temperature=2.0)``.
    """

    def __init__(self, **options):
        super().__init__()
        known = [p.name for p in inspect.signature(fused_compat_loss).parameters.values()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"FusedCompatLoss got unknown options {unknown}; known: {known}")
        check_stored_options(fused_compat_loss, options)
        self.options = options

    def forward(self, logits, labels, old_logits=None, new_logits=None, **overrides):
        return fused_compat_loss(logits, labels, old_logits, new_logits,
                                 **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


__all__ = ["fused_compat_loss", "FusedCompatLoss", "CompatStats"]
