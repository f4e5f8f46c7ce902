"""The token-chunked compat loss from hidden states and lm_head weights (README.md beside this file).

``linear_compat_loss_rows`` is a ``torch.library`` custom op: one chunked pass that never holds
more than one chunk of [tokens, V] logits, returning the row stats of ``compat_loss_rows`` and,
on request, the gradients of the reduced loss w.r.t. hidden, weight and bias.
``LinearCompatLossFunction`` is its autograd glue.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _dispatch

N_ROW_STATS = 9
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


def _rows3d(x: Tensor) -> Tensor:
    return (x if x.stride(-1) == 1 else x.contiguous()).unsqueeze(0)


@torch.library.custom_op("muscle_fast::linear_compat_loss_rows", mutates_args=())
def linear_compat_loss_rows(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
    old_hidden: Optional[Tensor], old_weight: Optional[Tensor], old_bias: Optional[Tensor],
    old_logits: Optional[Tensor],
    new_hidden: Optional[Tensor], new_weight: Optional[Tensor], new_bias: Optional[Tensor],
    new_logits: Optional[Tensor],
    mask: Optional[Tensor], scale: Tensor, row_grad: Optional[Tensor], impl: str, mask_mode: int,
    inv_temperature: float, kl_weight: float, ce_weight: float, ignore_index: int,
    old_label_logprob: bool, chunk_size: int, need_hidden: bool, need_weight: bool,
    need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row stats [N, 9] and the requested gradients (each an empty tensor when not requested).

    hidden [N, H], weight [V, H], bias [V]; each teacher is (hidden [N, H'], weight [V, H'], bias)
    or logits [N, V]; labels, mask, row_grad [N]. The gradient is that of
    ``sum_i row_grad_i * scale * loss_i`` (``row_grad`` None: all ones).
    """
    return linear_rows(
        hidden, weight, bias, labels, old_hidden, old_weight, old_bias, old_logits, new_hidden,
        new_weight, new_bias, new_logits, mask, scale, row_grad, _dispatch.launcher(impl),
        mask_mode, inv_temperature, kl_weight, ce_weight, ignore_index, old_label_logprob,
        chunk_size, need_hidden, need_weight, need_bias)


def linear_rows(
    hidden, weight, bias, labels, old_hidden, old_weight, old_bias, old_logits, new_hidden,
    new_weight, new_bias, new_logits, mask, scale, row_grad, launch, mask_mode, inv_temperature,
    kl_weight, ce_weight, ignore_index, old_label_logprob, chunk_size, need_hidden, need_weight,
    need_bias, group=None,
):
    """The chunked pass of ``linear_compat_loss_rows`` with any row-kernel launcher ``launch``.

    With a vocabulary split (``launch`` a ``VocabParallel``, weights and teacher logits this rank's
    vocabulary slice), the hidden gradient is this rank's share: it is summed over ``group``
    (one all-reduce of [N, H] float32) so that every rank returns the full gradient.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    with_grad = need_hidden or need_weight or need_bias
    rows = torch.zeros((n, N_ROW_STATS), dtype=torch.float32, device=dev)
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
        valid = labels != ignore_index
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
        o = old.logits(take(old_hidden)) if old is not None else take(old_logits)
        w = (new.logits(take(new_hidden)) if new is not None
             else None if new_logits is None else take(new_logits))
        y = take(labels)
        z3 = z.unsqueeze(0)
        # The gradient overwrites the chunk's logits (the row contract allows grad is logits).
        rows_c = launch(
            z3, y, _rows3d(o), None if w is None else _rows3d(w),
            None if mask is None else take(mask), z3 if with_grad else None, scale,
            mask_mode=mask_mode, inv_temperature=inv_temperature, kl_weight=kl_weight,
            ce_weight=ce_weight, ignore_index=ignore_index, old_label_logprob=old_label_logprob)
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
def _(hidden, weight, bias, labels, old_hidden, old_weight, old_bias, old_logits, new_hidden,
      new_weight, new_bias, new_logits, mask, scale, row_grad, impl, mask_mode, inv_temperature,
      kl_weight, ce_weight, ignore_index, old_label_logprob, chunk_size, need_hidden, need_weight,
      need_bias):
    rows = hidden.new_empty((hidden.shape[0], N_ROW_STATS), dtype=torch.float32)
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


def linear_pass(vocab_parallel, args, row_grad, opts, needs):
    """The custom op, or with a vocabulary split (``vocab_parallel``: a ``VocabParallel``) the
    same pass called directly (a process group cannot cross a ``torch.library`` op)."""
    if vocab_parallel is None:
        return torch.ops.muscle_fast.linear_compat_loss_rows(*args, row_grad, *opts, *needs)
    return linear_rows(*args, row_grad, vocab_parallel, *opts[1:], *needs,
                       group=vocab_parallel.group)


class LinearCompatLossFunction(torch.autograd.Function):
    """Reduced loss and row stats from one chunked pass.

    ``"mean"``/``"sum"``: the forward computes the gradients (already multiplied by the
    reduction's scale) and the backward multiplies them by the upstream scalar. ``"none"``: the
    upstream gradient is one value per row, which weighs every row of ``grad_weight`` and
    ``grad_bias`` differently, so the backward runs the chunked pass again with those weights.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, old_hidden, old_weight, old_bias, old_logits,
                new_hidden, new_weight, new_bias, new_logits, mask, scale, impl, mask_mode,
                inv_temperature, kl_weight, ce_weight, ignore_index, chunk_size, reduction,
                vocab_parallel=None):
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.needs = needs
        ctx.reduction = reduction
        eager_grads = reduction != "none" and any(needs)
        args = (hidden, weight, bias, labels, old_hidden, old_weight, old_bias, old_logits,
                new_hidden, new_weight, new_bias, new_logits, mask, scale)
        opts = (impl, mask_mode, inv_temperature, kl_weight, ce_weight, ignore_index, False,
                chunk_size)
        ctx.opts = opts
        ctx.vocab_parallel = vocab_parallel
        rows, gh, gw, gb = linear_pass(vocab_parallel, args, None, opts,
                                 needs if eager_grads else (False, False, False))
        if reduction == "none":
            loss = rows[:, 0].clone()
            if any(needs):
                ctx.save_for_backward(*args)
        else:
            loss = rows[:, 0].sum() if reduction == "sum" else rows[:, 0].sum() * scale
            if any(needs):
                ctx.save_for_backward(gh, gw, gb)
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
        if ctx.reduction == "none":
            args = ctx.saved_tensors
            _, gh, gw, gb = linear_pass(ctx.vocab_parallel, args, grad_loss.reshape(-1),
                                        ctx.opts, needs)
        else:
            gh, gw, gb = (_scaled(g, grad_loss) if need else None
                          for g, need in zip(ctx.saved_tensors, needs))
        grads = tuple(g if need else None for g, need in zip((gh, gw, gb), needs))
        return grads + (None,) * 20
