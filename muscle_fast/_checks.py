"""Checks of the public losses' arguments (docs/SPEC.md section 3), shared by both public losses.

Everything here reads shapes, dtypes, devices and Python values only, except ``check_values``:
the one check that reads tensor values, one small host sync on a GPU (``validate=True``).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .ops.compat_loss.contract import KERNEL_MASK_MODES, KernelOptions, MaskMode
from .ops.compat_loss.reference import MASKS, MASKS_NEEDING_NEW, REDUCTIONS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_float_dtype(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


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
        raise TypeError(f"{name} must hold integer ids (int64), got {x.dtype}")
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
    if isinstance(mask, str):
        if mask not in MASKS:
            raise ValueError(f"mask={mask!r} is not one of {MASKS} or a tensor")
        if mask in MASKS_NEEDING_NEW and not has_new:
            raise ValueError(f"mask={mask!r} needs new_logits (the new task model's logits)")
        mask_flat, mask_name, mask_mode = None, mask, KERNEL_MASK_MODES.get(mask, MaskMode.GIVEN)
    elif isinstance(mask, Tensor):
        if mask.dtype.is_complex:
            raise TypeError(f"mask tensor must be bool or 0/1 numbers, got {mask.dtype}")
        mask_flat = _check_token_tensor("mask", mask, lead, device, integer=False)
        mask_flat = mask_flat.to(torch.float32).contiguous()
        mask_name, mask_mode = None, MaskMode.GIVEN
    else:
        raise TypeError(f"mask must be a name or a tensor, got {type(mask).__name__}")
    if sequence_ids is not None:
        if mask_name != "sequence_likelihood":
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


def check_values(opts: Options, vocab: int) -> None:
    """The one check that reads values (labels in range, mask 0/1, a device ``num_items`` > 0):
    one small host sync."""
    if torch.compiler.is_compiling() or opts.labels.numel() == 0:
        return
    y = opts.labels
    bad_label = ((y < 0) | (y >= vocab)) & (y != opts.kernel.ignore_index)
    checks = {"labels": bad_label.any()}
    if opts.mask is not None:
        checks["mask"] = ((opts.mask != 0) & (opts.mask != 1)).any()
    if isinstance(opts.num_items, Tensor) and opts.num_items.device.type != "cpu":
        checks["num_items"] = ~torch.isfinite(opts.scale)
    flags = dict(zip(checks, torch.stack(list(checks.values())).tolist()))
    if flags["labels"]:
        first = y[bad_label][0].item()
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index="
                         f"{opts.kernel.ignore_index}; found {first}")
    if flags.get("mask"):
        raise ValueError("mask tensor must hold only 0/1 (or bool) values")
    if flags.get("num_items"):
        raise ValueError(f"num_items must be a finite number > 0, got {opts.num_items.item()}")
