"""The one place a backend is chosen: ``impl=`` argument, then ``MUSCLE_FAST_IMPL``, then automatic.

This module only picks a backend *name*; ``ops/compat_loss/backends.py`` maps a name to kernels.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Dict, NamedTuple

import torch

from ._checks import check_impl_name
from .ops.compat_loss.backends import NAMES as IMPLS
from .ops.compat_loss.backends import TAKES_SPARSE

ENV_VAR = "MUSCLE_FAST_IMPL"
logger = logging.getLogger("muscle_fast")


class ImplStatus(NamedTuple):
    available: bool
    reason: str


def _memo(fn):
    """Remember ``fn``'s result per arguments, in a plain dict: ``choose_impl`` runs inside
    ``torch.compile``'s trace, and Dynamo warns at every call of a ``functools.lru_cache``
    function (it ignores that cache and traces the function)."""
    results: dict = {}

    @functools.wraps(fn)
    def memoised(*args):
        if args not in results:
            results[args] = fn(*args)
        return results[args]

    memoised.cache_clear = results.clear
    return memoised


@_memo
def _triton_import() -> ImplStatus:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return ImplStatus(False, f"triton cannot be imported ({type(e).__name__}: {e})")
    return ImplStatus(True, f"triton {triton.__version__}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _version(text: str) -> tuple:
    return tuple(int(p) for p in (text.split("+")[0].split(".") + ["0", "0"])[:2] if p.isdigit())


@_memo
def _interpreter_numpy_clash() -> str:
    """"" unless this Triton's interpreter cannot run our loops with this NumPy: Triton < 3.7
    calls int() on a loop bound that NumPy >= 2.4 no longer converts (docs/FACTS.md)."""
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter fails with NumPy "
                f"{numpy.__version__} (runtime loop bounds); install numpy<2.4 or triton>=3.7")
    return ""


@_memo
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
        clash = _interpreter_numpy_clash()
        if clash:
            return ImplStatus(False, clash)
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


@_memo
def _say_once(message: str) -> None:
    logger.warning(message)


def _takes_sparse(impl: str) -> bool:
    return TAKES_SPARSE.get(impl, False)


def choose_impl(impl: str, device: torch.device, dtype: torch.dtype, sparse: bool = False) -> str:
    """Resolve ``impl`` ("auto" | one of IMPLS) for tensors on ``device`` of ``dtype``.

    ``sparse``: a teacher is a ``SparseTeacher``. A fused backend whose row kernel does not take
    one yet is an error when asked for, and ``"auto"`` then returns ``"torch_rows"`` (the row
    contract in PyTorch, ``ops/compat_loss/torch_rows.py``), saying so once.
    """
    source = "impl="
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            impl, source = env, f"{ENV_VAR}="
    if impl != "auto":
        check_impl_name(impl, source)
        if dtype == torch.float64 and impl != "torch":
            raise TypeError(f"{source}{impl!r} does not take float64 logits; use impl='torch'")
        status = _status(impl, device)
        if not status.available:
            # an explicit request that cannot be met is a bad argument for these tensors
            raise ValueError(f"{source}{impl!r} cannot run here: {status.reason}")
        if sparse and not _takes_sparse(impl):
            raise ValueError(f"{source}{impl!r} does not take a SparseTeacher yet (its row kernel "
                             "reads dense teacher rows only); use impl='auto' (the PyTorch row "
                             "function) or impl='torch' (the reference)")
        return impl
    if dtype == torch.float64:
        return "torch"
    preferred = "triton" if device.type == "cuda" else "native" if device.type == "cpu" else None
    if preferred is None:
        _say_once(f"muscle_fast: no fused kernel for {device.type} tensors; using impl='torch'")
        return "torch"
    status = _status(preferred, device)
    if sparse and not (status.available and _takes_sparse(preferred)):
        why = "does not take a SparseTeacher yet" if status.available else "is unavailable"
        if not torch.compiler.is_compiling():  # a logger call is a graph break: said eagerly
            _say_once(f"muscle_fast: impl={preferred!r} {why}; sparse teachers run the PyTorch "
                      "row function (ops/compat_loss/torch_rows.py)")
        return "torch_rows"
    if status.available:
        return preferred
    _say_once(f"muscle_fast: impl={preferred!r} unavailable ({status.reason}); using impl='torch'")
    return "torch"
