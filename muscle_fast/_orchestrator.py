"""The one path from a public loss to a kernel, shared by both public losses.

``fused_compat_loss`` and ``fused_linear_compat_loss`` check their arguments, build a *row
source* (``LogitsRows`` over logits, ``LinearRows`` over chunks of hidden states) and call
``run``. ``run`` picks the backend (``_dispatch``), sets up a vocabulary split, runs the one
value check, then either the float reference (``impl="torch"``) or the fused path: the
sequence-likelihood first pass when that mask is asked for, the autograd Function, the
statistics. A row source has three methods: ``reference(opts, return_stats)``,
``label_logprobs(impl, vocab_parallel, opts)`` and ``loss(impl, vocab_parallel, opts, kopts,
mask) -> (loss, rows)``.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor

from . import _dispatch
from ._checks import Options, check_values
from .ops.compat_loss.contract import MaskMode, Stat
from .ops.compat_loss.function import stats_from_rows
from .ops.compat_loss.reference import sequence_likelihood_mask, sequence_segments
from .ops.compat_loss.vocab_parallel import VocabParallel, vocab_shards


def run(source, opts: Options, *, impl: str, device: torch.device, dtype: torch.dtype,
        teacher_dtypes: Iterable[torch.dtype], vocab: int, process_group, vocab_start,
        validate: bool, return_stats: bool, has_new: bool, value_checks=None):
    """Run one call of a public loss over ``source``; returns the loss or ``(loss, stats)``.

    ``value_checks``: more checks for ``check_values``' one sync (a sparse teacher's labels).
    """
    sparse = getattr(source, "sparse", False)
    if sparse and (process_group is not None or vocab_start is not None):
        raise ValueError("a SparseTeacher with process_group= (a vocabulary-parallel lm_head) is "
                         "not supported yet: give the teachers as logits (or hidden states and "
                         "weights) there, or run the loss without process_group")
    impl = _dispatch.choose_impl(impl, device, dtype, sparse=sparse)
    if impl != "torch" and torch.float64 in set(teacher_dtypes):
        raise TypeError(f"impl={impl!r} takes float32/bfloat16/float16 teachers, got float64")
    vocab_parallel = None
    if process_group is not None or vocab_start is not None:
        vocab_parallel, vocab = vocab_parallel_setup(impl, process_group, vocab_start, vocab,
                                                     validate, device)
    if validate:
        check_values(opts, vocab, value_checks)
    if impl == "torch" and vocab_parallel is None:
        return source.reference(opts, return_stats)

    kopts = opts.kernel
    mask = opts.mask
    if opts.mask_name == "sequence_likelihood":
        rows = source.label_logprobs(impl, vocab_parallel, opts)
        kopts, mask = kopts._replace(mask_mode=int(MaskMode.GIVEN)), sequence_mask(rows, opts)
    loss, rows = source.loss(impl, vocab_parallel, opts, kopts, mask)
    if opts.reduction == "none":
        loss = loss.reshape(opts.lead)
    if not return_stats:
        return loss
    return loss, stats_from_rows(rows, opts.n_valid, has_new)


def sequence_mask(rows: Tensor, opts: Options) -> Tensor:
    """The ``"sequence_likelihood"`` mask [N] float32 from a first pass's row stats."""
    segments = sequence_segments(opts.lead, opts.sequence_ids, rows.device)
    return sequence_likelihood_mask(-rows[:, Stat.CE], rows[:, Stat.OLD_LOGP], opts.valid,
                                    segments).float()


def vocab_parallel_setup(impl: str, group, vocab_start, vocab_local: int, validate: bool,
                         device) -> Tuple[VocabParallel, Optional[int]]:
    """Check the vocabulary-parallel arguments; returns (launcher, global vocabulary or None).

    The global vocabulary is known after a small all_gather, run when ``vocab_start`` is None or
    to validate. Without it (``vocab_start`` given, ``validate=False``) it stays None: a label that
    no rank owns then makes its token's loss NaN in the combination, never a wrong number.
    """
    dist = torch.distributed
    if group is None:
        raise ValueError("vocab_start was given without process_group")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    if vocab_start is not None and (isinstance(vocab_start, bool) or
                                    not isinstance(vocab_start, numbers.Integral) or
                                    vocab_start < 0):
        raise ValueError(f"vocab_start must be an int >= 0 or None, got {vocab_start!r}")
    if vocab_start is None or validate:
        vocab_start, vocab = vocab_shards(group, vocab_local, vocab_start, device)
    else:
        vocab = None
    return VocabParallel(impl, group, vocab_start), vocab
