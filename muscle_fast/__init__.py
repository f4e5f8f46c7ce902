"""muscle_fast: fused kernels for MUSCLE, compatible LLM updates (arXiv 2407.09435)."""
from ._dispatch import available_impls
from .linear import fused_linear_compat_loss
from .loss import CompatStats, FusedCompatLoss, fused_compat_loss
from .metrics import compat_deltas, discriminative_flips, generative_flips
from .sparse_teacher import SparseTeacher

__version__ = "0.1.0"
__all__ = [
    "fused_compat_loss", "FusedCompatLoss", "CompatStats", "fused_linear_compat_loss",
    "SparseTeacher",
    "available_impls", "discriminative_flips", "generative_flips", "compat_deltas",
]
