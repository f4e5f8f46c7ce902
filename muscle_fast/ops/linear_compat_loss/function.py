"""The token-chunked compat loss from hidden states and lm_head weights (README.md beside this file).

``linear_compat_loss_rows`` is a ``torch.library`` custom op: one chunked pass that never holds
more than one chunk of [tokens, V] logits, returning the row stats of ``compat_loss_rows`` and,
on request, the gradients of the reduced loss w.r.t. hidden, weight and bias.
``LinearCompatLossFunction`` is its autograd glue.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compat_loss.backends import backend
from ..compat_loss.contract import N_STATS, KernelOptions, MaskMode, SparseRows, as_rows_3d
from ..compat_loss.function import flat_sparse, reduce_rows, reference_loss, sparse_kwargs

MIN_CHUNK = 32
# Bytes of chunk logits (student + GEMM teachers, fp32) per pass; chunk_size=None derives from it.
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}


@functools.lru_cache(maxsize=None)
def _mm_has_out_dtype() -> bool:
    return "dtype" in torch.ops.aten.mm.overloads()


def default_chunk_size(n_rows: int, vocab: int, n_gemm_logits: int, device: torch.device) -> int:
    """Tokens per chunk: the chunk's fp32 logits fit ``CHUNK_BYTES``; never fewer than 32 tokens."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    per_token = 4 * max(vocab, 1) * max(n_gemm_logits, 1)
    return max(1, min(max(n_rows, 1), max(MIN_CHUNK, budget // per_token)))


class _Linear:
    """One model's lm_head, with operands in the dtype the GEMM takes them."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        # Mixed-precision GEMMs with an fp32 result exist on CUDA (aten::mm.dtype); elsewhere the
        # weight is upcast once (an input-sized cost, never N x V).
        self.low = weight.dtype != torch.float32 and weight.is_cuda and _mm_has_out_dtype()
        self.weight = weight if self.low else weight.float()
        self.bias = None if bias is None else bias.float()

    def operand(self, h: Tensor) -> Tensor:
        return h if self.low else h.float()

    def logits(self, h: Tensor) -> Tensor:
        """fp32 logits [C, V] of one chunk (the GEMM's fp32 result: no low-precision round trip)."""
        h = self.operand(h)
        if self.low:
            z = torch.mm(h, self.weight.t(), out_dtype=torch.float32)
        else:
            z = torch.mm(h, self.weight.t())
        if self.bias is not None:
            z.add_(self.bias)
        return z


def _mm_f32(a: Tensor, b: Tensor, low: bool) -> Tensor:
    if low:
        return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
    return torch.mm(a, b)


def _take_slice(x: Tensor, sel: slice) -> Tensor:
    return x[sel]


def _take_index(x: Tensor, idx: Tensor) -> Tensor:
    return x.index_select(0, idx)


@torch.library.custom_op("muscle_fast::linear_compat_loss_rows", mutates_args=())
def linear_compat_loss_rows(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
    old_hidden: Optional[Tensor], old_weight: Optional[Tensor], old_bias: Optional[Tensor],
    old_logits: Optional[Tensor],
    old_idx: Optional[Tensor], old_lp: Optional[Tensor], old_row: Optional[Tensor],
    new_hidden: Optional[Tensor], new_weight: Optional[Tensor], new_bias: Optional[Tensor],
    new_logits: Optional[Tensor],
    new_idx: Optional[Tensor], new_lp: Optional[Tensor], new_row: Optional[Tensor],
    mask: Optional[Tensor], scale: Tensor, row_grad: Optional[Tensor], impl: str, mask_mode: int,
    inv_temperature: float, kl_weight: float, ce_weight: float, ignore_index: int,
    old_label_logprob: bool, chunk_size: int, need_hidden: bool, need_weight: bool,
    need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row stats [N, 9] and the requested gradients (each an empty tensor when not requested).

    hidden [N, H], weight [V, H], bias [V]; each teacher is (hidden [N, H'], weight [V, H'], bias)
    or logits [N, V] or a sparse teacher (idx, lp, row: ``contract.SparseRows``, no GEMM);
    labels, mask, row_grad [N]. The gradient is that of
    ``sum_i row_grad_i * scale * loss_i`` (``row_grad`` None: all ones).
    """
    kopts = KernelOptions(mask_mode, inv_temperature, kl_weight, ce_weight, ignore_index)
    return linear_rows(
        hidden, weight, bias, labels, old_hidden, old_weight, old_bias, old_logits, old_idx,
        old_lp, old_row, new_hidden, new_weight, new_bias, new_logits, new_idx, new_lp, new_row,
        mask, scale, row_grad, backend(impl).rows, kopts, old_label_logprob, chunk_size,
        need_hidden, need_weight, need_bias)


def linear_rows(
    hidden, weight, bias, labels, old_hidden, old_weight, old_bias, old_logits, old_idx, old_lp,
    old_row, new_hidden, new_weight, new_bias, new_logits, new_idx, new_lp, new_row, mask, scale,
    row_grad, launch, kopts: KernelOptions, old_label_logprob, chunk_size, need_hidden,
    need_weight, need_bias, group=None,
):
    """The chunked pass of ``linear_compat_loss_rows`` with any row-kernel launcher ``launch``.

    With a vocabulary split (``launch`` a ``VocabParallel``, weights and teacher logits this rank's
    vocabulary slice), the hidden gradient is this rank's share: it is summed over ``group``
    (one all-reduce of [N, H] float32) so that every rank returns the full gradient.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    with_grad = need_hidden or need_weight or need_bias
    rows = torch.zeros((n, N_STATS), dtype=torch.float32, device=dev)
    student = _Linear(weight, bias)
    old = None if old_weight is None else _Linear(old_weight, old_bias)
    new = None if new_weight is None else _Linear(new_weight, new_bias)
    # split vocabulary: the ranks' shares are summed in float32 before the one rounding
    gh_dtype = torch.float32 if group is not None else hidden.dtype
    gh = (torch.zeros(hidden.shape, dtype=gh_dtype, device=dev) if need_hidden
          else hidden.new_empty((0,)))
    gw = (torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_weight
          else weight.new_empty((0,)))
    gb = (torch.zeros(vocab, dtype=torch.float32, device=dev) if need_bias
          else weight.new_empty((0,)))
    # Ignored rows cost no GEMM: compacting them needs their count on the host, free on the CPU
    # (on a GPU it would be a sync, so there they run and get a zero gradient).
    index = None
    if dev.type == "cpu":
        valid = labels != kopts.ignore_index
        if not bool(valid.all()):
            index = valid.nonzero().squeeze(1)
    n_rows = n if index is None else index.numel()

    for start in range(0, n_rows, chunk_size):
        if index is None:
            sel = slice(start, min(start + chunk_size, n_rows))
            take = functools.partial(_take_slice, sel=sel)
        else:
            idx = index[start:start + chunk_size]
            take = functools.partial(_take_index, idx=idx)
        h = take(hidden)
        z = student.logits(h)
        o = (old.logits(take(old_hidden)) if old is not None
             else None if old_logits is None else take(old_logits))
        w = (new.logits(take(new_hidden)) if new is not None
             else None if new_logits is None else take(new_logits))
        y = take(labels)
        z3 = z.unsqueeze(0)
        # a sparse teacher's chunk is its rows of (idx, lp, row): no GEMM, no [C, V] logits
        sparse = sparse_kwargs(*(None if x is None else take(x) for x in
                                 (old_idx, old_lp, old_row, new_idx, new_lp, new_row)))
        # The gradient overwrites the chunk's logits (the row contract allows grad is logits).
        rows_c = launch(
            z3, y, as_rows_3d(o), as_rows_3d(w), None if mask is None else take(mask),
            z3 if with_grad else None, scale, **kopts.kwargs(old_label_logprob), **sparse)
        del o, w
        if index is None:
            rows[sel] = rows_c
        else:
            rows.index_copy_(0, idx, rows_c)
        if not with_grad:
            del z
            continue
        g = z
        if row_grad is not None:
            g.mul_(take(row_grad).to(torch.float32).unsqueeze(1))
        if need_hidden:
            gh_c = _mm_f32(g, student.weight, student.low)
            if index is None:
                gh[sel] = gh_c
            else:
                gh.index_copy_(0, idx, gh_c.to(gh.dtype))
        if need_weight:
            if student.low:
                gw.add_(_mm_f32(g.t(), h, True))
            else:
                gw.addmm_(g.t(), student.operand(h))
        if need_bias:
            gb.add_(g.sum(0))
        del g, z
    if need_hidden and group is not None:
        if torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(gh, group=group)
        gh = gh.to(hidden.dtype)
    if need_weight and weight.dtype != torch.float32:
        gw = gw.to(weight.dtype)
    if need_bias and bias is not None and bias.dtype != torch.float32:
        gb = gb.to(bias.dtype)
    return rows, gh, gw, gb


@linear_compat_loss_rows.register_fake
def _(hidden, weight, bias, labels, old_hidden, old_weight, old_bias, old_logits, old_idx,
      old_lp, old_row, new_hidden, new_weight, new_bias, new_logits, new_idx, new_lp, new_row,
      mask, scale, row_grad, impl, mask_mode, inv_temperature, kl_weight, ce_weight,
      ignore_index, old_label_logprob, chunk_size, need_hidden, need_weight, need_bias):
    rows = hidden.new_empty((hidden.shape[0], N_STATS), dtype=torch.float32)
    gh = hidden.new_empty(hidden.shape if need_hidden else (0,))
    gw = weight.new_empty(weight.shape if need_weight else (0,))
    gb_dtype = bias.dtype if bias is not None else torch.float32
    gb = weight.new_empty((weight.shape[0],) if need_bias else (0,), dtype=gb_dtype)
    return rows, gh, gw, gb


def _scaled(g: Tensor, grad_output: Tensor) -> Tensor:
    """g * grad_output (0-dim), in place outside torch.compile, no work on the CPU where it is 1."""
    if torch.compiler.is_compiling():
        return g * grad_output.to(g.dtype)
    if g.device.type == "cpu" and bool(grad_output == 1):
        return g
    return g.mul_(grad_output.to(g.dtype))


def linear_pass(impl: str, vocab_parallel, args, row_grad, kopts: KernelOptions,
                old_label_logprob: bool, chunk_size: int, needs):
    """One chunked pass: the single place that chooses between the ``torch.library`` op (one
    device) and ``linear_rows`` with ``vocab_parallel``'s launcher (a process group cannot cross
    a custom op)."""
    if vocab_parallel is None:
        return torch.ops.muscle_fast.linear_compat_loss_rows(
            *args, row_grad, impl, *kopts, old_label_logprob, chunk_size, *needs)
    return linear_rows(*args, row_grad, vocab_parallel, kopts, old_label_logprob, chunk_size,
                       *needs, group=vocab_parallel.group)


class LinearCompatLossFunction(torch.autograd.Function):
    """Reduced loss and row stats from one chunked pass.

    ``"mean"``/``"sum"``: the forward computes the gradients (already multiplied by the
    reduction's scale) and the backward multiplies them by the upstream scalar. ``"none"``: the
    upstream gradient is one value per row, which weighs every row of ``grad_weight`` and
    ``grad_bias`` differently, so the backward runs the chunked pass again with those weights.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, old_hidden, old_weight, old_bias, old_logits,
                old_idx, old_lp, old_row, new_hidden, new_weight, new_bias, new_logits, new_idx,
                new_lp, new_row, mask, scale, impl, vocab_parallel, kopts, chunk_size, reduction):
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.needs = needs
        ctx.reduction = reduction
        eager_grads = reduction != "none" and any(needs)
        args = (hidden, weight, bias, labels, old_hidden, old_weight, old_bias, old_logits,
                old_idx, old_lp, old_row, new_hidden, new_weight, new_bias, new_logits, new_idx,
                new_lp, new_row, mask, scale)
        ctx.pass_opts = (impl, vocab_parallel, kopts, chunk_size)
        rows, gh, gw, gb = linear_pass(impl, vocab_parallel, args, None, kopts, False, chunk_size,
                                       needs if eager_grads else (False, False, False))
        loss = reduce_rows(rows, scale, reduction)
        if any(needs):
            ctx.save_for_backward(*(args if reduction == "none" else (gh, gw, gb)))
        ctx.mark_non_differentiable(rows)
        return loss, rows

    @staticmethod
    def backward(ctx, grad_loss, grad_rows):
        if not torch.compiler.is_compiling():
            if getattr(ctx, "used", False):
                raise RuntimeError(
                    "fused_linear_compat_loss: backward ran twice through the same graph "
                    "(retain_graph=True); the saved gradients are scaled in place")
            ctx.used = True
        needs = ctx.needs
        impl, vocab_parallel, kopts, chunk_size = ctx.pass_opts
        if ctx.reduction == "none":
            args = ctx.saved_tensors
            _, gh, gw, gb = linear_pass(impl, vocab_parallel, args, grad_loss.reshape(-1), kopts,
                                        False, chunk_size, needs)
        else:
            gh, gw, gb = (_scaled(g, grad_loss) if need else None
                          for g, need in zip(ctx.saved_tensors, needs))
        grads = tuple(g if need else None for g, need in zip((gh, gw, gb), needs))
        return grads + (None,) * 22


class Teacher(NamedTuple):
    """One frozen teacher of the fused-linear loss: (hidden, weight, bias), its logits, or a
    ``SparseTeacher`` (``sparse``, with its kernel form ``rows``)."""

    hidden: Optional[Tensor]  # [N, H'] (detached), or None when logits are given
    weight: Optional[Tensor]  # [V, H']
    bias: Optional[Tensor]  # [V]
    logits: Optional[Tensor]  # [N, V]
    sparse: object = None  # a muscle_fast.SparseTeacher
    rows: Optional[SparseRows] = None  # contract.sparse_rows(sparse)

    def args(self) -> tuple:
        """The teacher's tensors as the custom op takes them (7, None where absent)."""
        return (self.hidden, self.weight, self.bias, self.logits) + flat_sparse(self.rows)

    def full_logits(self, lead):
        """The logits [*lead, V] the reference reads (a sparse teacher stays itself)."""
        if self.sparse is not None:
            return self.sparse
        if self.logits is not None:
            return self.logits.reshape(*lead, -1)
        return F.linear(self.hidden, self.weight, self.bias).reshape(*lead, -1)


_NO_TEACHER = Teacher(None, None, None, None)


class LinearRows:
    """The rows of ``fused_linear_compat_loss``, produced chunk by chunk from hidden states."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], old: Teacher,
                 new: Optional[Teacher], chunk_size: Optional[int]):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.h2 = hidden.reshape(-1, hidden.shape[-1])
        self.old, self.new = old, new
        self.sparse = any(t is not None and t.sparse is not None for t in (old, new))
        n_gemm = 1 + sum(t is not None and t.hidden is not None for t in (old, new))
        self.chunk = (int(chunk_size) if chunk_size is not None else
                      default_chunk_size(self.h2.shape[0], weight.shape[0], n_gemm, hidden.device))

    def reference(self, opts, return_stats: bool):
        with torch.no_grad():
            old_full = self.old.full_logits(opts.lead)
            new_full = None if self.new is None else self.new.full_logits(opts.lead)
        logits = F.linear(self.hidden, self.weight, self.bias)
        return reference_loss(logits, old_full, new_full, opts, return_stats)

    def label_logprobs(self, impl, vocab_parallel, opts) -> Tensor:
        kopts = opts.kernel._replace(mask_mode=int(MaskMode.ALL_OLD), kl_weight=0.0, ce_weight=0.0)
        bias = None if self.bias is None else self.bias.detach()
        args = (self.h2.detach(), self.weight.detach(), bias, opts.labels, *self.old.args(),
                *_NO_TEACHER.args(), None, opts.scale)
        rows, *_ = linear_pass(impl, vocab_parallel, args, None, kopts, True, self.chunk,
                               (False, False, False))
        return rows

    def loss(self, impl, vocab_parallel, opts, kopts: KernelOptions, mask: Optional[Tensor]):
        new = self.new if self.new is not None else _NO_TEACHER
        return LinearCompatLossFunction.apply(
            self.h2, self.weight, self.bias, opts.labels, *self.old.args(), *new.args(), mask,
            opts.scale, impl, vocab_parallel, kopts, self.chunk, opts.reduction)
