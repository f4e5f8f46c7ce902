"""Public compat loss: validate the inputs, choose a backend, run it."""
from __future__ import annotations

import inspect
import math
import numbers
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _dispatch
from .ops.compat_loss.function import (
    MASK_MODES, MASK_TENSOR, CompatLossFunction, compat_loss_rows, stats_from_rows,
)
from .ops.compat_loss.vocab_parallel import VocabParallel, vocab_shards
from .ops.compat_loss.reference import (
    MASKS, MASKS_NEEDING_NEW, REDUCTIONS, CompatStats, compat_loss_reference,
    sequence_likelihood_mask, sequence_segments,
)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_float_tensor(name: str, x, lead_shape, vocab: int, device) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but logits is on {device}")
    if x.shape[:-1] != lead_shape or x.shape[-1] != vocab:
        extra = (" (MUSCLE needs one tokenizer: teachers and student share the vocabulary)"
                 if x.shape[:-1] == lead_shape else "")
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected "
                         f"{tuple(lead_shape) + (vocab,)}{extra}")
    if x.requires_grad:
        raise ValueError(f"{name} requires grad: teachers are frozen, pass {name}.detach() "
                         "(or compute it under torch.no_grad())")


def _check_token_tensor(name: str, x, lead_shape, device, *, integer: bool) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if integer and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must hold integer ids (int64), got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but logits is on {device}")
    if x.shape != lead_shape and x.shape != (lead_shape.numel(),):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(lead_shape)} "
                         f"(or [{lead_shape.numel()}]) to match logits {tuple(lead_shape)} x vocab")
    return x.reshape(-1)


def _check_number(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


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
    student's argmax misses the label; see SPEC section 2 for every mask). Forward and gradient
    run in one fused kernel (Triton on CUDA, C++ on CPU); the backward reuses that gradient.

    Args:
        logits: student logits [N, V] or [B, T, V], fp32/bf16/fp16, unit stride on V.
        labels: int64 ids [N] or [B, T]; ``logits[i]`` predicts ``labels[i]`` (callers shift).
        old_logits: frozen logits of the old task model (required by every mask).
        new_logits: frozen logits of the new task model (required by ``"muscle"``,
            ``"token_likelihood"``, ``"sequence_likelihood"``; optional otherwise, its term is 0).
        mask: a mask name, or a bool/0-1 tensor [N] or [B, T] (1 = align to old).
        temperature: T > 0 of the KL terms (the CE is at T = 1). No hidden T**2 factor.
        kl_weight, ce_weight: weights >= 0; a term with weight 0 is left out.
        ignore_index: label of tokens that contribute nothing.
        reduction: ``"mean"`` over valid tokens, ``"sum"`` or ``"none"``.
        num_items: for ``"mean"``, divide by this global token count instead (gradient
            accumulation, data parallel).
        sequence_ids: for ``"sequence_likelihood"`` on packed rows: runs of equal ids are sequences.
        inplace_backward: the gradient overwrites ``logits`` (saves one [N, V] buffer); do not
            use ``logits`` after the call. Fused backends only, outside ``torch.compile``.
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
            break: the collectives are not traced).
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
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    device, vocab, lead = logits.device, logits.shape[-1], logits.shape[:-1]
    if vocab == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    if old_logits is None:
        raise ValueError("old_logits is required: every mask aligns some tokens to the old model")
    _check_float_tensor("old_logits", old_logits, lead, vocab, device)
    if new_logits is not None:
        _check_float_tensor("new_logits", new_logits, lead, vocab, device)
    opts = check_options(
        labels, lead, device, has_new=new_logits is not None, mask=mask, temperature=temperature,
        kl_weight=kl_weight, ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
        num_items=num_items, sequence_ids=sequence_ids,
        scale_dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    impl = _dispatch.choose_impl(impl, device, logits.dtype)
    if impl != "torch" and (old_logits.dtype == torch.float64 or
                            (new_logits is not None and new_logits.dtype == torch.float64)):
        raise TypeError(f"impl={impl!r} takes float32/bfloat16/float16 teachers, got float64")
    launch = None
    if process_group is not None or vocab_start is not None:
        launch, vocab = vocab_parallel_launcher(impl, process_group, vocab_start, vocab, validate,
                                                device)
    if validate:
        check_values(opts, vocab)

    if impl == "torch" and launch is None:
        out = compat_loss_reference(
            logits, opts.labels.view(lead), old_logits, new_logits,
            mask=mask if opts.mask is None else opts.mask, temperature=opts.temperature,
            kl_weight=opts.kl_weight, ce_weight=opts.ce_weight, ignore_index=ignore_index,
            reduction=reduction, num_items=num_items, sequence_ids=sequence_ids,
            return_stats=return_stats)
        if not return_stats:
            return out
        loss, stats = out
        if logits.dtype != torch.float64:
            for name, value in vars(stats).items():
                if value is not None:
                    setattr(stats, name, value.float())
        return loss, stats

    z3, old3 = as_rows_3d(logits), as_rows_3d(old_logits)
    new3 = None if new_logits is None else as_rows_3d(new_logits)
    if mask == "sequence_likelihood":
        with torch.no_grad():
            # a first launch for every token's log p(y) of the student and the old model
            if launch is None:
                rows, _ = compat_loss_rows(
                    z3.detach(), opts.labels, old3, None, None, opts.scale, impl,
                    MASK_MODES["all_old"], opts.inv_temperature, 0.0, 0.0, opts.ignore_index,
                    True, False)
            else:
                rows = launch(
                    z3.detach(), opts.labels, old3, None, None, None, opts.scale,
                    mask_mode=MASK_MODES["all_old"], inv_temperature=opts.inv_temperature,
                    kl_weight=0.0, ce_weight=0.0, ignore_index=opts.ignore_index,
                    old_label_logprob=True)
        mask_mode, m = MASK_TENSOR, sequence_mask_from_rows(rows, opts)
    else:
        mask_mode, m = opts.mask_mode, opts.mask

    loss, rows = CompatLossFunction.apply(
        z3, opts.labels, old3, new3, m, opts.scale, impl, mask_mode, opts.inv_temperature,
        opts.kl_weight, opts.ce_weight, opts.ignore_index, reduction, bool(inplace_backward),
        launch)
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_stats:
        return loss
    return loss, stats_from_rows(rows, opts.n_valid, new_logits is not None)


def vocab_parallel_launcher(impl: str, group, vocab_start, vocab_local: int, validate: bool,
                            device) -> Tuple[VocabParallel, Optional[int]]:
    """Check the vocabulary-parallel arguments; returns (launcher, global vocabulary or None).

    The global vocabulary is known after a small all_gather, run when ``vocab_start`` is None or
    to validate. Without it (``vocab_start`` given, ``validate=False``) it stays None: a label that
    no rank owns then makes its token's loss NaN in the combination, never a wrong number.
    """
    dist = torch.distributed
    if group is None:
        raise ValueError("vocab_start was given without process_group")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    if vocab_start is not None and (isinstance(vocab_start, bool) or
                                    not isinstance(vocab_start, numbers.Integral) or
                                    vocab_start < 0):
        raise ValueError(f"vocab_start must be an int >= 0 or None, got {vocab_start!r}")
    if vocab_start is None or validate:
        vocab_start, vocab = vocab_shards(group, vocab_local, vocab_start, device)
    else:
        vocab = None
    return VocabParallel(impl, group, vocab_start), vocab


class Options(NamedTuple):
    """Checked options and the per-call tensors every backend needs (built by check_options)."""

    labels: Tensor  # [N] int64, contiguous
    valid: Tensor  # [N] bool
    n_valid: Tensor  # 0-dim float32
    scale: Tensor  # 0-dim float32: the reduction's factor on every row's loss and gradient
    mask: Optional[Tensor]  # [N] float32 0/1 for a caller's mask tensor, else None
    mask_mode: int
    lead: torch.Size
    sequence_ids: Optional[Tensor]
    inv_temperature: float
    temperature: float
    kl_weight: float
    ce_weight: float
    ignore_index: int


def check_options(labels, lead, device, *, has_new, mask, temperature, kl_weight, ce_weight,
                  ignore_index, reduction, num_items, sequence_ids,
                  scale_dtype=torch.float32) -> Options:
    """Check every option and token-level tensor (no value is read); derive the per-call tensors.

    ``scale`` is float32 (what the kernels take), float64 for the float64 vocabulary-parallel path.
    """
    labels_flat = _check_token_tensor("labels", labels, lead, device, integer=True)
    if isinstance(mask, str):
        if mask not in MASKS:
            raise ValueError(f"mask={mask!r} is not one of {MASKS} or a tensor")
        if mask in MASKS_NEEDING_NEW and not has_new:
            raise ValueError(f"mask={mask!r} needs new_logits (the new task model's logits)")
        mask_flat, mask_mode = None, MASK_MODES.get(mask, MASK_TENSOR)
    elif isinstance(mask, Tensor):
        if mask.dtype.is_complex:
            raise TypeError(f"mask tensor must be bool or 0/1 numbers, got {mask.dtype}")
        mask_flat = _check_token_tensor("mask", mask, lead, device, integer=False)
        mask_flat, mask_mode = mask_flat.to(torch.float32).contiguous(), MASK_TENSOR
    else:
        raise TypeError(f"mask must be a name or a tensor, got {type(mask).__name__}")
    if sequence_ids is not None:
        if not (isinstance(mask, str) and mask == "sequence_likelihood"):
            raise ValueError("sequence_ids is only used by mask='sequence_likelihood'")
        _check_token_tensor("sequence_ids", sequence_ids, lead, device, integer=True)
    temperature = _check_number("temperature", temperature, positive=True)
    kl_weight = _check_number("kl_weight", kl_weight, positive=False)
    ce_weight = _check_number("ce_weight", ce_weight, positive=False)
    if kl_weight == 0 and ce_weight == 0:
        raise ValueError("kl_weight and ce_weight are both 0: the loss would be identically 0")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    if num_items is not None:
        if reduction != "mean":
            raise ValueError("num_items is the divisor of reduction='mean'; "
                             f"it has no meaning with reduction={reduction!r}")
        if isinstance(num_items, Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must hold one number, got shape {tuple(num_items.shape)}")
            if num_items.device != device and num_items.device.type != "cpu":
                raise ValueError(f"num_items is on {num_items.device} but logits is on {device}")
        else:
            _check_number("num_items", num_items, positive=True)

    y = labels_flat.to(torch.int64).contiguous()
    valid = y != ignore_index
    n_valid = valid.sum().to(torch.float32)
    if reduction != "mean":
        scale = torch.ones((), dtype=scale_dtype, device=device)
    elif num_items is not None:
        scale = 1.0 / torch.as_tensor(num_items, dtype=scale_dtype, device=device).reshape(())
    else:
        scale = 1.0 / n_valid.to(scale_dtype).clamp(min=1)
    return Options(
        labels=y, valid=valid, n_valid=n_valid, scale=scale, mask=mask_flat, mask_mode=mask_mode,
        lead=lead, sequence_ids=sequence_ids, inv_temperature=1.0 / temperature,
        temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
        ignore_index=int(ignore_index))


def check_values(opts: Options, vocab: int) -> None:
    """The one check that reads values (labels in range, mask 0/1): one small host sync."""
    if torch.compiler.is_compiling() or opts.labels.numel() == 0:
        return
    y = opts.labels
    bad_label = ((y < 0) | (y >= vocab)) & (y != opts.ignore_index)
    checks = [bad_label.any()]
    if opts.mask is not None:
        checks.append(((opts.mask != 0) & (opts.mask != 1)).any())
    flags = torch.stack(checks).tolist()
    if flags[0]:
        first = y[bad_label][0].item()
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index="
                         f"{opts.ignore_index}; found {first}")
    if len(flags) > 1 and flags[1]:
        raise ValueError("mask tensor must hold only 0/1 (or bool) values")


def sequence_mask_from_rows(rows: Tensor, opts: Options) -> Tensor:
    """The "sequence_likelihood" mask [N] float32 from a first launch's row stats (cols 7, 8)."""
    segments = sequence_segments(opts.lead, opts.sequence_ids, rows.device)
    return sequence_likelihood_mask(-rows[:, 7], rows[:, 8], opts.valid, segments).float()


def as_rows_3d(x: Tensor) -> Tensor:
    """[B, T, V] view with unit stride on V (a copy only when the vocabulary stride is not 1)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.unsqueeze(0) if x.dim() == 2 else x


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
        self.options = options

    def forward(self, logits, labels, old_logits=None, new_logits=None, **overrides):
        return fused_compat_loss(logits, labels, old_logits, new_logits,
                                 **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


__all__ = ["fused_compat_loss", "FusedCompatLoss", "CompatStats"]
