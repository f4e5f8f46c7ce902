"""Launcher of the native CPU row kernel (csrc/compat_loss.cpp, bound as ``muscle_fast._native``).

Implements the row contract of ``README.md`` beside this file. No policy here: the public
function validates user input; this launcher only asserts the contract and passes pointers,
sizes, strides (in elements) and dtype codes to the extension.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .contract import (
    N_PARTIALS, N_ROW_CONSTS, N_SPARSE_COLS, N_STATS, MaskMode, SparseRows, as_rows_3d,
)


def contract_mismatch(ext) -> str:
    """"" when the extension was built from this contract (csrc/compat_loss.h vs contract.py),
    else what differs (a stale build of an older or newer csrc/)."""
    ours = {"N_STATS": N_STATS, "N_PARTIALS": N_PARTIALS, "N_ROW_CONSTS": N_ROW_CONSTS,
            "N_SPARSE_COLS": N_SPARSE_COLS, "MASK_MODES": {m.name: int(m) for m in MaskMode}}
    theirs = {k: getattr(ext, k, None) for k in ours}
    theirs["MASK_MODES"] = dict(theirs["MASK_MODES"] or {})
    diff = [f"{k}: extension {theirs[k]!r}, contract.py {v!r}" for k, v in ours.items()
            if theirs[k] != v]
    return "; ".join(diff)


try:
    from muscle_fast import _native
except ImportError as exc:  # built without a compiler, or a broken build
    _native = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = contract_mismatch(_native)
    if _IMPORT_ERROR:
        _native = None
        _IMPORT_ERROR = ("the extension was built from another version of csrc/ (rebuild it: "
                         f"pip install -e .): {_IMPORT_ERROR}")

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_NULL = (0, 0, (0, 0, 1))
# "" = the best instruction set this CPU supports; "baseline", "avx2", "avx512" force one (tests,
# benchmarks).
ISA = os.environ.get("MUSCLE_FAST_NATIVE_ISA", "")


def native_available() -> Tuple[bool, str]:
    """(True, "") when the extension is importable, else (False, why)."""
    if _native is None:
        return False, f"muscle_fast._native is not built or failed to import ({_IMPORT_ERROR})"
    return True, ""


def _operand(x: Optional[torch.Tensor], name: str):
    if x is None:
        return _NULL
    assert x.device.type == "cpu", f"{name} must be on the CPU"
    assert x.dtype in DTYPE_CODES, f"{name}: unsupported dtype {x.dtype}"
    assert x.dim() == 3 and x.stride(-1) == 1, f"{name} must be [B, T, V] with stride(-1) == 1"
    return x.data_ptr(), DTYPE_CODES[x.dtype], tuple(x.stride())


def _sparse(x: Optional[SparseRows], n: int):
    if x is None:
        return (0, 0, 0, 0)
    k = x.idx.shape[-1]
    assert x.idx.dtype == torch.int32 and x.idx.is_contiguous() and x.idx.shape == (n, k)
    assert x.lp.dtype == torch.float32 and x.lp.is_contiguous() and x.lp.shape == (n, k)
    assert x.row.dtype == torch.float32 and x.row.is_contiguous()
    assert x.row.shape == (n, N_SPARSE_COLS)
    assert all(t.device.type == "cpu" for t in x), "a sparse teacher must be on the CPU"
    return (x.idx.data_ptr(), x.lp.data_ptr(), x.row.data_ptr(), k)


def compat_loss_native(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logits: Optional[torch.Tensor],
    new_logits: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    grad: Optional[torch.Tensor],
    scale: torch.Tensor,
    *,
    mask_mode: int,
    inv_temperature: float,
    kl_weight: float,
    ce_weight: float,
    ignore_index: int,
    old_label_logprob: bool,
    old_sparse: Optional[SparseRows] = None,
    new_sparse: Optional[SparseRows] = None,
) -> torch.Tensor:
    """Row statistics [B*T, N_STATS] float32 of the compat loss; writes d loss_i / d logits * scale
    into ``grad`` when given (``grad`` may be ``logits``). See README.md for the columns. A
    teacher is its logits or a ``SparseRows`` (``old_sparse`` / ``new_sparse``, README.md)."""
    if _native is None:
        raise RuntimeError(native_available()[1])
    logits, old_logits, new_logits, grad = map(as_rows_3d, (logits, old_logits, new_logits, grad))
    B, T, V = logits.shape
    n = B * T
    assert labels.dtype == torch.int64 and labels.is_contiguous() and labels.numel() == n
    assert old_logits is None or old_logits.shape == logits.shape
    assert new_logits is None or new_logits.shape == logits.shape
    assert grad is None or (grad.shape == logits.shape and grad.dtype == logits.dtype)
    if mask is not None:
        assert mask.dtype == torch.float32 and mask.is_contiguous() and mask.numel() == n
    assert scale.dtype == torch.float32 and scale.numel() == 1 and scale.device.type == "cpu"
    row_stats = torch.empty(n, N_STATS, dtype=torch.float32)
    if n == 0:
        return row_stats
    z = _operand(logits, "logits")
    o = _operand(old_logits, "old_logits")
    w = _operand(new_logits, "new_logits")
    g = _operand(grad, "grad")
    _native.compat_loss_rows(
        B,
        T,
        V,
        z[0],
        z[1],
        z[2],
        labels.data_ptr(),
        o[0],
        o[1],
        o[2],
        w[0],
        w[1],
        w[2],
        0 if mask is None else mask.data_ptr(),
        g[0],
        g[1],
        g[2],
        row_stats.data_ptr(),
        float(scale.item()),
        int(mask_mode),
        float(inv_temperature),
        float(kl_weight),
        float(ce_weight),
        int(ignore_index),
        bool(old_label_logprob),
        max(1, torch.get_num_threads()),
        ISA,
        _sparse(old_sparse, n),
        _sparse(new_sparse, n),
    )
    return row_stats


# ------------------------------------------------------------------ vocabulary parallel kernels


def _check_slice(logits, labels, old_logits, new_logits):
    if _native is None:
        raise RuntimeError(native_available()[1])
    logits, old_logits, new_logits = map(as_rows_3d, (logits, old_logits, new_logits))
    B, T, V = logits.shape
    assert labels.dtype == torch.int64 and labels.is_contiguous() and labels.numel() == B * T
    assert old_logits is None or old_logits.shape == logits.shape
    assert new_logits is None or new_logits.shape == logits.shape
    return logits, old_logits, new_logits


def compat_partials_native(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logits: Optional[torch.Tensor],
    new_logits: Optional[torch.Tensor],
    *,
    inv_temperature: float,
    ignore_index: int,
    old_at_one: bool,
) -> torch.Tensor:
    """Partial statistics float32 [B*T, N_PARTIALS] of this rank's vocabulary slice; ``labels`` are local
    ids (README.md, "Vocabulary parallel")."""
    logits, old_logits, new_logits = _check_slice(logits, labels, old_logits, new_logits)
    B, T, V = logits.shape
    partials = torch.empty(B * T, N_PARTIALS, dtype=torch.float32)
    if B * T == 0:
        return partials
    z = _operand(logits, "logits")
    o = _operand(old_logits, "old_logits")
    w = _operand(new_logits, "new_logits")
    _native.compat_partials(
        B, T, V,
        z[0], z[1], z[2],
        labels.data_ptr(),
        o[0], o[1], o[2],
        w[0], w[1], w[2],
        partials.data_ptr(),
        float(inv_temperature),
        int(ignore_index),
        bool(old_at_one),
        max(1, torch.get_num_threads()),
        ISA,
    )
    return partials


def compat_grad_rows_native(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logits: Optional[torch.Tensor],
    new_logits: Optional[torch.Tensor],
    grad: torch.Tensor,
    consts: torch.Tensor,
    *,
    inv_temperature: float,
    has_kl: bool,
    has_ce: bool,
) -> None:
    """Writes this slice's d loss_i / d logits into ``grad`` (which may be ``logits``) from the row
    constants ``consts`` float32 [B*T, N_ROW_CONSTS] (README.md, "Vocabulary parallel")."""
    logits, old_logits, new_logits = _check_slice(logits, labels, old_logits, new_logits)
    grad = as_rows_3d(grad)
    B, T, V = logits.shape
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    assert consts.dtype == torch.float32 and consts.is_contiguous()
    assert consts.shape == (B * T, N_ROW_CONSTS)
    assert consts.device.type == "cpu", "consts must be on the CPU"
    if B * T == 0:
        return
    z = _operand(logits, "logits")
    o = _operand(old_logits, "old_logits")
    w = _operand(new_logits, "new_logits")
    g = _operand(grad, "grad")
    _native.compat_grad_rows(
        B, T, V,
        z[0], z[1], z[2],
        labels.data_ptr(),
        o[0], o[1], o[2],
        w[0], w[1], w[2],
        g[0], g[1], g[2],
        consts.data_ptr(),
        float(inv_temperature),
        bool(has_kl),
        bool(has_ce),
        max(1, torch.get_num_threads()),
        ISA,
    )
