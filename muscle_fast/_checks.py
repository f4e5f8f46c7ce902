"""Checks of the public losses' arguments (docs/SPEC.md section 3), shared by both public losses.

Everything here reads shapes, dtypes, devices and Python values only, except ``check_values``:
the one check that reads tensor values, one small host sync on a GPU (``validate=True``).
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .ops.compat_loss.backends import NAMES as IMPLS
from .ops.compat_loss.contract import KERNEL_MASK_MODES, KernelOptions, MaskMode
from .ops.compat_loss.reference import MASKS, MASKS_NEEDING_NEW, REDUCTIONS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: What every float input accepts (float64 runs the reference, impl="torch").
FLOAT_DTYPES_TEXT = "float32, bfloat16, float16 or float64 (float64: impl='torch' only)"


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_float_dtype(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{name} must be {FLOAT_DTYPES_TEXT}, got {x.dtype}")


def _may_overlap(x: Tensor) -> bool:
    """False when sizes and strides prove that no two elements of ``x`` share memory: taken by
    increasing stride, each dimension's step exceeds every offset the smaller ones reach.
    (PyTorch's in-place ops refuse only the stride-0 case; rows that overlap otherwise, e.g.
    through ``as_strided``, are caught here too.)"""
    if x.numel() <= 1:
        return False
    reach = 0
    for size, stride in sorted(((s, abs(st)) for s, st in zip(x.shape, x.stride()) if s > 1),
                               key=lambda d: d[1]):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def check_inplace_target(name: str, x: Tensor) -> None:
    """``inplace_backward=True`` writes the gradient over ``x`` when autograd will ask for it:
    refuse the tensors on which PyTorch's own in-place ops refuse to write. One check for every
    backend, ``impl="torch"`` included (which does not write), so that a call that works on one
    backend works on all. Inside ``torch.compile`` the flag writes nothing (functionalised)."""
    if not (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return
    base = x._base if x._base is not None else x
    if base.is_leaf:
        what = "a leaf tensor" if base is x else "a view of a leaf tensor"
        raise ValueError(
            f"inplace_backward=True would overwrite {name}, {what} that requires grad (an "
            "nn.Parameter?), with its gradient: PyTorch refuses in-place ops on such a leaf. Pass "
            f"inplace_backward=False, or {name} computed from it (e.g. an lm_head's output)")
    if _may_overlap(x):
        raise ValueError(
            f"inplace_backward=True cannot write the gradient over {name}: elements of {name} "
            f"share memory (sizes {tuple(x.shape)}, strides {tuple(x.stride())}, e.g. an "
            f"expand()ed tensor), so one element's gradient would overwrite another's logit. "
            f"Pass inplace_backward=False, or {name}.contiguous()")


def check_same_device(name: str, x: Tensor, device, anchor: str) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {anchor} is on {device}")


def check_teacher_logits(name: str, x, lead_shape, vocab: int, device) -> None:
    """A frozen teacher's logits: float, on the student's device, the student's shape."""
    check_float_dtype(name, x)
    check_same_device(name, x, device, "logits")
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
        raise TypeError(f"{name} must hold integer ids (any integer dtype: int64, int32, ...), "
                        f"got {x.dtype}")
    check_same_device(name, x, device, "logits")
    if x.shape != lead_shape and x.shape != (lead_shape.numel(),):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(lead_shape)} "
                         f"(or [{lead_shape.numel()}]) to match logits {tuple(lead_shape)} x vocab")
    return x.reshape(-1)


def _check_number(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def _check_num_items(num_items, reduction: str, device) -> None:
    if num_items is None:
        return
    if reduction != "mean":
        raise ValueError("num_items is the divisor of reduction='mean'; "
                         f"it has no meaning with reduction={reduction!r}")
    if not isinstance(num_items, Tensor):
        _check_number("num_items", num_items, positive=True)
        return
    if num_items.numel() != 1:
        raise ValueError(f"num_items must hold one number, got shape {tuple(num_items.shape)}")
    if num_items.dtype == torch.bool or num_items.dtype.is_complex:
        raise TypeError(f"num_items must be a real number, got a {num_items.dtype} tensor")
    if num_items.device.type == "cpu":
        # reading a CPU tensor is no device sync: checked like a Python number
        _check_number("num_items", num_items.item(), positive=True)
    elif num_items.device != device:
        raise ValueError(f"num_items is on {num_items.device} but logits is on {device}")


def check_loss_options(*, mask, temperature, kl_weight, ce_weight, ignore_index, reduction):
    """The loss's options that need no tensor, checked the same way wherever they are given: at
    each call, and where they are stored (``FusedCompatLoss(...)``, ``CompatArguments(...)``).
    Returns ``(temperature, kl_weight, ce_weight)`` as floats."""
    if isinstance(mask, str):
        if mask not in MASKS:
            raise ValueError(f"mask={mask!r} is not one of {MASKS} or a tensor")
    elif isinstance(mask, Tensor):
        if mask.dtype.is_complex:
            raise TypeError(f"mask tensor must be bool or 0/1 numbers, got {mask.dtype}")
    else:
        raise TypeError(f"mask must be a name or a tensor, got {type(mask).__name__}")
    temperature = _check_number("temperature", temperature, positive=True)
    kl_weight = _check_number("kl_weight", kl_weight, positive=False)
    ce_weight = _check_number("ce_weight", ce_weight, positive=False)
    if kl_weight == 0 and ce_weight == 0:
        raise ValueError("kl_weight and ce_weight are both 0: the loss would be identically 0")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    return temperature, kl_weight, ce_weight


def check_impl_name(impl, source: str = "impl=") -> str:
    """``impl`` is "auto" or a backend name (whether it can run here is _dispatch's question)."""
    if not isinstance(impl, str) or impl not in ("auto",) + IMPLS:
        raise ValueError(f"{source}{impl!r} is not one of {('auto',) + IMPLS}")
    return impl


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or
                                   not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


_LOSS_OPTIONS = ("mask", "temperature", "kl_weight", "ce_weight", "ignore_index", "reduction")
_FLAGS = ("inplace_backward", "return_stats", "validate", "fused_linear")


def check_stored_options(loss_fn, options: dict) -> None:
    """Options stored for later calls of ``loss_fn`` (``FusedCompatLoss(...)``,
    ``CompatArguments(...)``), checked where they are written with the calls' own checks; an
    option not in ``options`` takes ``loss_fn``'s default. Options that need the tensors (a mask
    that needs new_logits, ``num_items``) are checked at the call."""
    defaults = {p.name: p.default for p in inspect.signature(loss_fn).parameters.values()
                if p.default is not inspect.Parameter.empty}
    merged = {**defaults, **options}
    check_loss_options(**{k: merged[k] for k in _LOSS_OPTIONS})
    for name in _FLAGS:
        if name in merged:
            check_flag(name, merged[name])
    check_impl_name(merged.get("impl", "auto"))
    check_chunk_size(merged.get("chunk_size"))


class Options(NamedTuple):
    """Checked options and the per-call tensors every backend needs (built by check_options)."""

    labels: Tensor  # [N] int64, contiguous
    valid: Tensor  # [N] bool
    n_valid: Tensor  # 0-dim float32
    scale: Tensor  # 0-dim: the reduction's factor on every row's loss and gradient (NaN: bad count)
    mask: Optional[Tensor]  # [N] float32 0/1 for a caller's mask tensor, else None
    mask_name: Optional[str]  # the mask's name, None for a tensor
    lead: torch.Size
    sequence_ids: Optional[Tensor]
    temperature: float
    reduction: str
    num_items: "None | float | Tensor"
    kernel: KernelOptions  # mask_mode of the name (GIVEN for a tensor or sequence_likelihood)


def check_options(labels, lead, device, *, has_new, mask, temperature, kl_weight, ce_weight,
                  ignore_index, reduction, num_items, sequence_ids,
                  scale_dtype=torch.float32) -> Options:
    """Check every option and token-level tensor (no device value is read); derive the per-call
    tensors. ``scale`` is float32 (what the kernels take), float64 for the float64
    vocabulary-parallel path."""
    labels_flat = _check_token_tensor("labels", labels, lead, device, integer=True)
    temperature, kl_weight, ce_weight = check_loss_options(
        mask=mask, temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
        ignore_index=ignore_index, reduction=reduction)
    if isinstance(mask, str):
        if mask in MASKS_NEEDING_NEW and not has_new:
            raise ValueError(f"mask={mask!r} needs new_logits (the new task model's logits)")
        mask_flat, mask_name, mask_mode = None, mask, KERNEL_MASK_MODES.get(mask, MaskMode.GIVEN)
    else:
        mask_flat = _check_token_tensor("mask", mask, lead, device, integer=False)
        mask_flat = mask_flat.to(torch.float32).contiguous()
        mask_name, mask_mode = None, MaskMode.GIVEN
    if sequence_ids is not None:
        if mask_name != "sequence_likelihood":
            raise ValueError("sequence_ids is only used by mask='sequence_likelihood'")
        _check_token_tensor("sequence_ids", sequence_ids, lead, device, integer=True)
    _check_num_items(num_items, reduction, device)

    y = labels_flat.to(torch.int64).contiguous()
    valid = y != ignore_index
    n_valid = valid.sum().to(torch.float32)
    if reduction != "mean":
        scale = torch.ones((), dtype=scale_dtype, device=device)
    elif num_items is not None:
        count = torch.as_tensor(num_items, dtype=scale_dtype, device=device).reshape(())
        # a device count is not read here (a sync): a non-positive or non-finite one gives NaN
        ok = torch.isfinite(count) & (count > 0)
        scale = torch.where(ok, 1.0 / count, torch.full_like(count, float("nan")))
    else:
        scale = 1.0 / n_valid.to(scale_dtype).clamp(min=1)
    return Options(
        labels=y, valid=valid, n_valid=n_valid, scale=scale, mask=mask_flat, mask_name=mask_name,
        lead=lead, sequence_ids=sequence_ids, temperature=temperature, reduction=reduction,
        num_items=num_items,
        kernel=KernelOptions(mask_mode=int(mask_mode), inv_temperature=1.0 / temperature,
                             kl_weight=kl_weight, ce_weight=ce_weight,
                             ignore_index=int(ignore_index)))


def check_values(opts: Options, vocab: int, extra: Optional[dict] = None) -> None:
    """The one check that reads values (labels in range, mask 0/1, a device ``num_items`` > 0):
    one small host sync. ``extra``: name -> (0-dim bool tensor that is True for bad input, the
    error message), read in the same sync."""
    if torch.compiler.is_compiling() or opts.labels.numel() == 0:
        return
    y = opts.labels
    bad_label = ((y < 0) | (y >= vocab)) & (y != opts.kernel.ignore_index)
    checks = {"labels": bad_label.any()}
    if opts.mask is not None:
        checks["mask"] = ((opts.mask != 0) & (opts.mask != 1)).any()
    if isinstance(opts.num_items, Tensor) and opts.num_items.device.type != "cpu":
        checks["num_items"] = ~torch.isfinite(opts.scale)
    extra = extra or {}
    checks.update({name: bad.reshape(()) for name, (bad, _) in extra.items()})
    flags = dict(zip(checks, torch.stack(list(checks.values())).tolist()))
    if flags["labels"]:
        first = y[bad_label][0].item()
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index="
                         f"{opts.kernel.ignore_index}; found {first}")
    if flags.get("mask"):
        raise ValueError("mask tensor must hold only 0/1 (or bool) values")
    if flags.get("num_items"):
        raise ValueError(f"num_items must be a finite number > 0, got {opts.num_items.item()}")
    for name, (_, message) in extra.items():
        if flags[name]:
            raise ValueError(message)
