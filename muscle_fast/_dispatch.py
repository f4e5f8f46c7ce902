"""The one place a backend is chosen: ``impl=`` argument, then ``MUSCLE_FAST_IMPL``, then automatic."""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Dict, NamedTuple, Tuple

import torch

IMPLS = ("triton", "native", "torch")
ENV_VAR = "MUSCLE_FAST_IMPL"
logger = logging.getLogger("muscle_fast")


class ImplStatus(NamedTuple):
    available: bool
    reason: str


@functools.lru_cache(maxsize=None)
def _triton_import() -> ImplStatus:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return ImplStatus(False, f"triton cannot be imported ({type(e).__name__}: {e})")
    return ImplStatus(True, f"triton {triton.__version__}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _native_status() -> ImplStatus:
    try:
        from .ops.compat_loss.native import native_available
    except ImportError as e:
        return ImplStatus(False, f"native launcher missing ({e})")
    ok, why = native_available()
    return ImplStatus(bool(ok), why or ("C++ extension muscle_fast._native" if ok else "unknown"))


def _triton_status(device: torch.device) -> ImplStatus:
    imported = _triton_import()
    if not imported.available:
        return imported
    if device.type == "cuda":
        return imported
    if device.type == "cpu" and _interpreting():
        return ImplStatus(True, "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors")
    return ImplStatus(
        False, f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    )


def _status(impl: str, device: torch.device) -> ImplStatus:
    if impl == "triton":
        return _triton_status(device)
    if impl == "native":
        if device.type != "cpu":
            return ImplStatus(False, f"native runs on CPU tensors, got {device.type}")
        return _native_status()
    return ImplStatus(True, "PyTorch reference (float32 compute)")


def available_impls(device: "torch.device | str | None" = None) -> Dict[str, ImplStatus]:
    """Which backends can run on ``device`` (default: CUDA if present, else CPU), and why not.

    Example: ``{'triton': ImplStatus(False, 'triton runs on CUDA tensors ...'),
    'native': ImplStatus(True, ...), 'torch': ImplStatus(True, ...)}``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {impl: _status(impl, device) for impl in IMPLS}


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    logger.warning(message)


def choose_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``impl`` ("auto" | one of IMPLS) for tensors on ``device`` of ``dtype``."""
    source = "impl="
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            impl, source = env, f"{ENV_VAR}="
    if impl != "auto":
        if impl not in IMPLS:
            raise ValueError(f"{source}{impl!r} is not one of {('auto',) + IMPLS}")
        if dtype == torch.float64 and impl != "torch":
            raise TypeError(f"{source}{impl!r} does not take float64 logits; use impl='torch'")
        status = _status(impl, device)
        if not status.available:
            raise RuntimeError(f"{source}{impl!r} cannot run here: {status.reason}")
        return impl
    if dtype == torch.float64:
        return "torch"
    preferred = "triton" if device.type == "cuda" else "native" if device.type == "cpu" else None
    if preferred is None:
        _say_once(f"muscle_fast: no fused kernel for {device.type} tensors; using impl='torch'")
        return "torch"
    status = _status(preferred, device)
    if status.available:
        return preferred
    _say_once(f"muscle_fast: impl={preferred!r} unavailable ({status.reason}); using impl='torch'")
    return "torch"


def launcher(impl: str) -> Callable:
    """The row-kernel launcher of a fused backend (contract: ops/compat_loss/README.md)."""
    if impl == "triton":
        from .ops.compat_loss.triton import compat_loss_triton

        return compat_loss_triton
    if impl == "native":
        from .ops.compat_loss.native import compat_loss_native

        return compat_loss_native
    raise ValueError(f"impl={impl!r} has no row kernel")


def vocab_parallel_kernels(impl: str) -> Tuple[Callable, Callable]:
    """``(compat_partials_<impl>, compat_grad_rows_<impl>)``: the two kernels of the vocabulary
    parallel loss (contract: ops/compat_loss/README.md, "Vocabulary parallel")."""
    if impl == "triton":
        from .ops.compat_loss.triton import compat_grad_rows_triton, compat_partials_triton

        return compat_partials_triton, compat_grad_rows_triton
    if impl == "native":
        from .ops.compat_loss.native import compat_grad_rows_native, compat_partials_native

        return compat_partials_native, compat_grad_rows_native
    if impl == "torch":
        from .ops.compat_loss.vocab_parallel import compat_grad_rows_torch, compat_partials_torch

        return compat_partials_torch, compat_grad_rows_torch
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


def grad_scaler(device: torch.device) -> Callable:
    """``f(grad, grad_output)``: grad *= grad_output in place, with no work where it is 1."""
    if device.type == "cuda":
        from .ops.compat_loss.triton import scale_rows_triton

        return scale_rows_triton
    return _scale_rows_host


def _scale_rows_host(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    # CPU tensors: reading the upstream gradient is not a device sync
    if bool((grad_output == 1).all()):
        return
    go = grad_output.to(torch.float32)
    grad.mul_(go.reshape(grad.shape[:-1] + (1,)) if go.dim() > 0 else go)
