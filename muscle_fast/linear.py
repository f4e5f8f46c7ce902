"""Public fused-linear compat loss: the loss from hidden states and lm_head weights."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from . import _orchestrator
from ._checks import (
    check_chunk_size,
    check_flag,
    check_float_dtype,
    check_options,
    check_same_device,
    check_teacher_logits,
)
from .ops.compat_loss.contract import sparse_rows
from .ops.linear_compat_loss.function import LinearRows, Teacher
from .sparse_teacher import SparseTeacher, check_sparse_teachers


def _check_float(name: str, x, device) -> None:
    check_float_dtype(name, x)
    check_same_device(name, x, device, "hidden")


def _check_head(prefix: str, hidden, weight, bias, lead, vocab: Optional[int], device):
    """Check one model's (hidden, weight, bias); returns (hidden [N, H], weight, bias)."""
    _check_float(f"{prefix}hidden", hidden, device)
    _check_float(f"{prefix}weight", weight, device)
    if hidden.dim() < 1 or hidden.shape[:-1] != lead:
        raise ValueError(f"{prefix}hidden has shape {tuple(hidden.shape)}, expected "
                         f"{tuple(lead)} x hidden size")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}weight has shape {tuple(weight.shape)}, expected "
                         f"[vocab, {hidden.shape[-1]}] to match {prefix}hidden")
    if vocab is not None and weight.shape[0] != vocab:
        raise ValueError(f"{prefix}weight has vocabulary {weight.shape[0]}, the student {vocab} "
                         "(MUSCLE needs one tokenizer: teachers and student share the vocabulary)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}weight is {weight.dtype} but {prefix}hidden is {hidden.dtype}")
    if bias is not None:
        _check_float(f"{prefix}bias", bias, device)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}bias has shape {tuple(bias.shape)}, expected "
                             f"[{weight.shape[0]}]")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{prefix}bias is {bias.dtype} but {prefix}weight is {weight.dtype}")
    return hidden.reshape(-1, hidden.shape[-1]), weight, bias


def _check_teacher(name: str, hidden, weight, bias, logits, lead, vocab,
                   device) -> Optional[Teacher]:
    if logits is not None:
        if hidden is not None or weight is not None or bias is not None:
            raise ValueError(f"give {name}_logits or ({name}_hidden, {name}_weight), not both")
        if isinstance(logits, SparseTeacher):  # checked with the options
            return Teacher(None, None, None, None, logits, sparse_rows(logits))
        check_teacher_logits(f"{name}_logits", logits, lead, vocab, device)
        return Teacher(None, None, None, logits.reshape(-1, vocab))
    if hidden is None and weight is None:
        if bias is not None:
            raise ValueError(f"{name}_bias was given without {name}_hidden and {name}_weight")
        return None
    if hidden is None or weight is None:
        missing = f"{name}_hidden" if hidden is None else f"{name}_weight"
        raise ValueError(f"{missing} is missing: a teacher is ({name}_hidden, {name}_weight) "
                         f"or {name}_logits")
    h, w, b = _check_head(f"{name}_", hidden, weight, bias, lead, vocab, device)
    # Teachers are frozen: whatever their requires_grad, they get no gradient.
    return Teacher(h.detach(), w.detach(), None if b is None else b.detach(), None)


def fused_linear_compat_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    old_hidden: Optional[Tensor] = None,
    old_weight: Optional[Tensor] = None,
    old_bias: Optional[Tensor] = None,
    old_logits: Optional[Tensor] = None,
    new_hidden: Optional[Tensor] = None,
    new_weight: Optional[Tensor] = None,
    new_bias: Optional[Tensor] = None,
    new_logits: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    mask: Union[str, Tensor] = "muscle",
    temperature: float = 2.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: Union[None, int, float, Tensor] = None,
    sequence_ids: Optional[Tensor] = None,
    process_group=None,
    vocab_start: Optional[int] = None,
    impl: str = "auto",
    return_stats: bool = False,
    validate: bool = True,
    **unknown,
):
    """:func:`fused_compat_loss` on lm_head logits, without materialising the [N, V] logits.

    Equals::

        fused_compat_loss(
            F.linear(hidden, weight, bias), labels,
            old_logits if old_logits is not None else F.linear(old_hidden, old_weight, old_bias).detach(),
            new_logits if new_logits is not None else F.linear(new_hidden, new_weight, new_bias).detach(),
            mask=mask, temperature=temperature, ...)

    with the logits computed in float32 (the GEMM's fp32 result; bf16/fp16 logits are never
    rounded before the softmax). The fused backends run over chunks of ``chunk_size`` tokens: per
    chunk the student and teacher GEMMs, the fused loss kernel (its gradient written over the
    chunk's logits), ``grad_hidden = g @ weight`` and ``grad_weight += g.T @ hidden`` in float32;
    the chunk's logits are freed before the next. Peak extra memory is one chunk of logits plus
    the float32 ``grad_weight`` accumulator, independent of N. On CPU, ignored tokens cost no GEMM.
    ``impl="torch"`` (and float64 inputs) run the expression above literally, materialised.

    Args:
        hidden: student last hidden states [N, H] or [B, T, H], fp32/bf16/fp16 (fp64:
            ``impl="torch"``).
        weight: student lm_head weight [V, H], dtype of ``hidden``. A weight that does not
            require grad (frozen lm_head, LoRA) skips the weight-gradient GEMM.
        labels: integer ids [N] or [B, T] (int64, int32, ...); ``hidden[i]`` predicts
            ``labels[i]`` (callers shift).
        bias: student lm_head bias [V] or None.
        old_hidden, old_weight, old_bias: the old task model's last hidden states
            ([N, H'] or [B, T, H'], H' may differ from H) and lm_head [V, H'] (and bias). Or
        old_logits: its logits [N, V] or [B, T, V], or a :class:`SparseTeacher` (then no
            teacher GEMM runs at all). One of the two forms is required.
        new_hidden, new_weight, new_bias, new_logits: the new task model, likewise; optional for
            the masks that do not need it. Teachers receive no gradient (their hidden states and
            weights are detached; teacher logits that require grad are an error, as in
            :func:`fused_compat_loss`).
        chunk_size: tokens per chunk. None: as many as fit a budget of fp32 chunk logits
            (``CHUNK_BYTES``: 128 MiB on CPU, 1 GiB on CUDA), at least 32 tokens.
        process_group, vocab_start: a column-sharded (vocabulary-parallel) lm_head: ``weight``,
            ``bias`` and each teacher's weight, bias or logits hold this rank's vocabulary rows
            ``[vocab_start, vocab_start + V_local)``; ``hidden`` and ``labels`` (global ids) are
            the same on every rank. The loss and stats are those of the whole vocabulary on every
            rank; ``weight`` and ``bias`` get their slice's gradient and ``hidden`` the full
            gradient (its per-rank shares are summed with one all-reduce of N x H float32: do not
            all-reduce it again, e.g. in a Megatron "copy to tensor parallel region").
            Collectives per chunk as in :func:`fused_compat_loss`. Runs the chunked path for
            every ``impl`` (``"torch"`` included), in float32.
        mask, temperature, kl_weight, ce_weight, ignore_index, reduction, num_items,
        sequence_ids, impl, return_stats, validate: as in :func:`fused_compat_loss`. Its
            ``inplace_backward`` is no option here (a TypeError): there are no [N, V] logits to
            overwrite, and each chunk's gradient already overwrites that chunk's logits.
            ``reduction="none"`` with a trainable ``weight`` or ``bias`` runs the chunked pass
            again in the backward (the per-token upstream gradient weighs every token's share of
            ``grad_weight``).

    Returns:
        The loss (float32, 0-dim, or the leading shape for ``"none"``), or ``(loss, stats)``.

    Shape:
        hidden: [N, H] or [B, T, H]; weight: [V, H]; bias: [V]; labels, mask, sequence_ids: [N]
        or [B, T]; gradients have the shapes and dtypes of hidden, weight and bias.
    """
    # --- checks of types, shapes, devices and options: free, always on ---
    if "inplace_backward" in unknown:
        raise TypeError("fused_linear_compat_loss has no inplace_backward option: it never holds "
                        "the [N, V] logits, and each chunk's gradient already overwrites that "
                        "chunk's logits (what inplace_backward does in fused_compat_loss)")
    if unknown:
        raise TypeError("fused_linear_compat_loss() got an unexpected keyword argument "
                        f"{sorted(unknown)[0]!r}")
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    device, lead = hidden.device, hidden.shape[:-1]
    _, weight, bias = _check_head("", hidden, weight, bias, lead, None, device)
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    old = _check_teacher("old", old_hidden, old_weight, old_bias, old_logits, lead, vocab, device)
    new = _check_teacher("new", new_hidden, new_weight, new_bias, new_logits, lead, vocab, device)
    if old is None:
        raise ValueError("the old teacher is required, as (old_hidden, old_weight) or old_logits: "
                         "every mask aligns some tokens to the old model")
    check_chunk_size(chunk_size)
    return_stats = check_flag("return_stats", return_stats)
    validate = check_flag("validate", validate)
    opts = check_options(
        labels, lead, device, has_new=new is not None, mask=mask, temperature=temperature,
        kl_weight=kl_weight, ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
        num_items=num_items, sequence_ids=sequence_ids)
    value_checks = check_sparse_teachers(old.sparse, None if new is None else new.sparse, opts,
                                         lead, vocab, device)
    teacher_dtypes = [t.dtype for tt in (old, new) if tt is not None for t in tt[:4]
                      if t is not None]
    return _orchestrator.run(
        LinearRows(hidden, weight, bias, old, new, chunk_size), opts, impl=impl, device=device,
        dtype=hidden.dtype, teacher_dtypes=teacher_dtypes, vocab=vocab,
        process_group=process_group, vocab_start=vocab_start, validate=validate,
        return_stats=return_stats, has_new=new is not None, value_checks=value_checks)


__all__ = ["fused_linear_compat_loss"]
