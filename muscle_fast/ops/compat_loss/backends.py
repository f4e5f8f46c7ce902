"""The backend table: a backend name -> its kernels, imported on first use.

Every fused backend implements the row contract of README.md beside this file; the ``torch``
backend has no row kernel (``reference.py`` runs instead) but has the vocabulary-parallel kernels
and the gradient scaling, in PyTorch. Choosing the name is ``muscle_fast._dispatch``'s job; this
table only maps a name to code.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

NAMES = ("triton", "native", "torch")
# Whether a backend's row kernel takes sparse teachers (README.md, "Sparse teachers"): a table
# rather than an import, so that dispatch reads it without loading any kernel module.
TAKES_SPARSE = {"triton": True, "native": True, "torch": True, "torch_rows": True}


class Backend(NamedTuple):
    name: str
    rows: Optional[Callable]  # compat_loss_<name>: the row kernel (None: the reference runs)
    partials: Callable  # compat_partials_<name>: vocabulary-parallel statistics of a slice
    grad_rows: Callable  # compat_grad_rows_<name>: a slice's gradient from row constants
    scale: Callable  # scale_rows_<name>(grad, grad_output): grad *= grad_output in place
    sparse: bool = False  # rows() takes sparse teachers: TAKES_SPARSE[name]


def backend(name: str) -> Backend:
    """The kernels of backend ``name`` (one of ``NAMES``), importing its module once."""
    return _backend(name)._replace(sparse=TAKES_SPARSE.get(name, False))


@functools.lru_cache(maxsize=None)
def _backend(name: str) -> Backend:
    if name == "triton":
        from . import triton as k

        return Backend(name, k.compat_loss_triton, k.compat_partials_triton,
                       k.compat_grad_rows_triton, k.scale_rows_triton)
    if name == "native":
        from . import native as k
        from .torch_kernels import scale_rows_torch

        # on CPU tensors the upstream multiply is a PyTorch op: no native kernel needed
        return Backend(name, k.compat_loss_native, k.compat_partials_native,
                       k.compat_grad_rows_native, scale_rows_torch)
    if name == "torch_rows":
        # not a user-facing impl name: the row contract in PyTorch, which the fused path runs
        # for sparse teachers where the chosen backend's kernel does not take them yet
        from . import torch_kernels as k
        from .torch_rows import compat_loss_torch_rows

        return Backend(name, compat_loss_torch_rows, k.compat_partials_torch,
                       k.compat_grad_rows_torch, k.scale_rows_torch)
    if name == "torch":
        from . import torch_kernels as k

        return Backend(name, None, k.compat_partials_torch, k.compat_grad_rows_torch,
                       k.scale_rows_torch)
    raise ValueError(f"no backend named {name!r}; known: {NAMES}")
