"""muscle_fast: fused kernels for MUSCLE, compatible LLM updates (arXiv 2407.09435)."""
from ._dispatch import available_impls
from .loss import CompatStats, FusedCompatLoss, fused_compat_loss

__version__ = "0.1.0"
__all__ = ["fused_compat_loss", "FusedCompatLoss", "CompatStats", "available_impls"]
