"""A plain PyTorch loop step for people who do not use transformers.Trainer."""
from __future__ import annotations

from torch import Tensor

from .model import CompatArguments, CompatModel, compat_loss

__all__ = ["compat_training_step"]


def compat_training_step(model: CompatModel, batch: dict, optimizer=None,
                         args: CompatArguments | None = None,
                         num_items: None | int | Tensor = None,
                         scheduler=None) -> dict:
    """One MUSCLE step: teachers, student, fused loss, ``backward()``, then (with an optimizer)
    ``optimizer.step(); optimizer.zero_grad()``.

    For gradient accumulation call it with ``optimizer=None`` on each micro-batch, passing
    ``num_items`` = valid shifted labels (``(labels[:, 1:] != -100).sum()``) of the whole
    accumulated batch, then step the optimizer yourself.

    Returns the loss and the loss stats as Python floats (``{"loss": ..., "frac_to_old": ...}``).
    """
    model.train()
    loss, stats = compat_loss(model, batch, args, num_items=num_items)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), **stats.to_dict()}
