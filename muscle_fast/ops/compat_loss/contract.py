"""The row contract every backend implements (README.md beside this file): columns, mask codes.

Kernels index these tensors by number; everything else names the column. The native extension
exports the same numbers from ``csrc/compat_loss.h`` and ``native.py`` compares them at import.
"""
from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple, Optional

import torch
from torch import Tensor


class Stat(IntEnum):
    """Columns of the row statistics ``[B*T, N_STATS]`` float32 a row kernel returns."""

    LOSS = 0  # loss_i, unscaled
    TO_OLD = 1  # m_i
    HIT_STUDENT = 2  # argmax z == y
    HIT_OLD = 3  # argmax o == y
    HIT_NEW = 4  # argmax w == y (0 without new)
    KL_OLD = 5
    KL_NEW = 6  # 0 without new
    CE = 7  # lse_s^1 - z[y]
    OLD_LOGP = 8  # log_softmax(o)[y] at T = 1 (when requested, else 0)


class Partial(IntEnum):
    """Columns of the vocabulary-parallel partial statistics ``[B*T, N_PARTIALS]`` float32."""

    Z_MAX = 0
    Z_ARG = 1
    Z_ST = 2
    Z_S1 = 3
    Z_Y = 4
    O_MAX = 5
    O_ARG = 6
    O_S = 7
    O_A = 8  # sum e ((o - ref_o) - (z - ref_z)) k: differences to this slice's maxima only
    O_S1 = 9
    O_Y = 10
    W_MAX = 11
    W_ARG = 12
    W_S = 13
    W_A = 14  # as O_A for new


class RowConst(IntEnum):
    """Columns of the vocabulary-parallel gradient row constants ``[B*T, N_ROW_CONSTS]`` float32."""

    ZREF = 0  # the student's reference (global max, 0 when -inf)
    S_T = 1  # sum exp((z - zref) / T)
    S_1 = 2  # sum exp(z - zref)
    TREF = 3  # the selected teacher's reference
    S_TT = 4  # the selected teacher's sum exp((t - tref) / T); 1 without a teacher
    C_KL = 5  # kl_weight * scale / T (0 without a teacher, NaN for a bad label)
    C_CE = 6  # ce_weight * scale
    SEL = 7  # -1 ignored, 0 no teacher, 1 old, 2 new


class MaskMode(IntEnum):
    """The ``mask_mode`` code a row kernel takes."""

    GIVEN = 0  # a [B*T] float32 0/1 tensor
    MUSCLE = 1
    OLD_CORRECT = 2
    TOKEN_LIKELIHOOD = 3
    ALL_OLD = 4


class SparseCol(IntEnum):
    """Columns of a sparse teacher's per-row scalars ``SparseRows.row`` [B*T, N_SPARSE_COLS]
    float32."""

    TAIL = 0  # log P_tail, the log of the mass outside the k ids (-inf: none)
    ARGMAX = 1  # the teacher's first-index argmax at T = 1, as a float (exact below 2^24)
    LABEL_LP = 2  # log_softmax(o)[y] at T = 1 (0 when the teacher was built without labels)


class SparseRows(NamedTuple):
    """A sparse teacher as a row kernel takes it (README.md, "Sparse teachers")."""

    idx: Tensor  # [B*T, k] int32 contiguous: distinct ids, ascending within each row
    lp: Tensor  # [B*T, k] float32 contiguous: log p of idx at the loss's temperature
    row: Tensor  # [B*T, N_SPARSE_COLS] float32 contiguous: columns SparseCol


def sparse_rows(teacher) -> SparseRows:
    """The kernel form of a ``muscle_fast.SparseTeacher``: rows flattened, each row's ids sorted
    ascending (its log-probabilities permuted alike), the per-row scalars packed as floats."""
    k = teacher.indices.shape[-1]
    idx = teacher.indices.reshape(-1, k)
    idx, order = idx.sort(dim=1)
    lp = teacher.logprobs.reshape(-1, k).gather(1, order)
    tail = teacher.tail_logprob.reshape(-1)
    label_lp = (torch.zeros_like(tail) if teacher.label_logprob is None
                else teacher.label_logprob.reshape(-1))
    row = torch.stack([tail, teacher.argmax.reshape(-1).to(torch.float32), label_lp], 1)
    return SparseRows(idx.contiguous(), lp.contiguous(), row)


def is_sparse(teacher) -> bool:
    """A teacher given as a ``SparseTeacher`` (duck-typed: ``ops/`` never imports the public
    layer) rather than a logits tensor or None."""
    return teacher is not None and not isinstance(teacher, Tensor)


N_STATS = len(Stat)
N_PARTIALS = len(Partial)
N_ROW_CONSTS = len(RowConst)
N_SPARSE_COLS = len(SparseCol)

# mask name -> the code its kernel computes; "sequence_likelihood" runs as GIVEN after a first pass
KERNEL_MASK_MODES = {
    "muscle": MaskMode.MUSCLE,
    "old_correct": MaskMode.OLD_CORRECT,
    "token_likelihood": MaskMode.TOKEN_LIKELIHOOD,
    "all_old": MaskMode.ALL_OLD,
}

# Sel codes of RowConst.SEL.
SEL_IGNORED, SEL_NONE, SEL_OLD, SEL_NEW = -1, 0, 1, 2


def as_rows_3d(x: Optional[Tensor]) -> Optional[Tensor]:
    """[B, T, V] view of an [N, V] or [B, T, V] tensor with unit stride on V (a copy only when
    the vocabulary stride is not 1); None stays None."""
    if x is None:
        return None
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.unsqueeze(0) if x.dim() == 2 else x


class KernelOptions(NamedTuple):
    """The scalar options every row launch takes (keyword arguments of the row contract)."""

    mask_mode: int
    inv_temperature: float
    kl_weight: float
    ce_weight: float
    ignore_index: int

    def kwargs(self, old_label_logprob: bool = False) -> dict:
        return dict(self._asdict(), old_label_logprob=old_label_logprob)
