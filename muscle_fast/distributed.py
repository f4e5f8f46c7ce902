"""Data parallel MUSCLE training: the global token count that makes each rank's mean a global mean."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["global_num_items"]


def global_num_items(labels: Tensor, ignore_index: int = -100, group=None) -> Tensor:
    """``all_reduce((labels != ignore_index).sum(), SUM, group)``: valid tokens over all ranks.

    Pass it as ``num_items`` to ``fused_compat_loss`` (labels already shifted) or to
    ``compat_training_step`` / ``compat_loss`` (count ``labels[:, 1:]``: they shift). Each rank's
    loss is then its share of the global sum over tokens divided by the global count, so the
    ranks' losses add up to the mean over the whole data parallel batch. DDP and FSDP2 *average*
    gradients over ranks, so multiply each rank's loss by the world size before ``backward()``
    (what ``transformers.Trainer`` does when ``average_tokens_across_devices`` is on); then the
    gradient equals that of one process on the concatenated batch.

    Without an initialised process group (or with one rank) this is the local count.

    Args:
        labels: int ids of any shape, ``ignore_index`` where a token contributes nothing.
        ignore_index: the label of ignored tokens.
        group: the process group of the data parallel ranks (default: the world).

    Returns:
        A 0-dim int64 tensor on ``labels.device`` (one all-reduce; no host sync).
    """
    n = (labels != ignore_index).sum().to(torch.int64)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(n, op=dist.ReduceOp.SUM, group=group)
    return n
