"""Triton kernels of the compat loss: one program per token row (math and contract: README.md)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .contract import (
    N_PARTIALS,
    N_ROW_CONSTS,
    N_STATS,
    SEL_IGNORED,
    SEL_NEW,
    SEL_OLD,
    MaskMode,
    Partial,
    RowConst,
    Stat,
)

# contract.py's columns and codes as constexprs: @triton.jit code reads only constexpr globals
_c = tl.constexpr
N_STATS_C, N_PARTIALS_C, N_ROW_CONSTS_C = _c(N_STATS), _c(N_PARTIALS), _c(N_ROW_CONSTS)
S_LOSS, S_TO_OLD, S_HIT_STUDENT = _c(Stat.LOSS.value), _c(Stat.TO_OLD.value), _c(Stat.HIT_STUDENT.value)
S_HIT_OLD, S_HIT_NEW, S_KL_OLD = _c(Stat.HIT_OLD.value), _c(Stat.HIT_NEW.value), _c(Stat.KL_OLD.value)
S_KL_NEW, S_CE, S_OLD_LOGP = _c(Stat.KL_NEW.value), _c(Stat.CE.value), _c(Stat.OLD_LOGP.value)
P_Z_MAX, P_Z_ARG, P_Z_ST = _c(Partial.Z_MAX.value), _c(Partial.Z_ARG.value), _c(Partial.Z_ST.value)
P_Z_S1, P_Z_Y, P_O_MAX = _c(Partial.Z_S1.value), _c(Partial.Z_Y.value), _c(Partial.O_MAX.value)
P_O_ARG, P_O_S, P_O_A = _c(Partial.O_ARG.value), _c(Partial.O_S.value), _c(Partial.O_A.value)
P_O_S1, P_O_Y, P_W_MAX = _c(Partial.O_S1.value), _c(Partial.O_Y.value), _c(Partial.W_MAX.value)
P_W_ARG, P_W_S, P_W_A = _c(Partial.W_ARG.value), _c(Partial.W_S.value), _c(Partial.W_A.value)
C_ZREF, C_S_T, C_S_1 = _c(RowConst.ZREF.value), _c(RowConst.S_T.value), _c(RowConst.S_1.value)
C_TREF, C_S_TT, C_C_KL = _c(RowConst.TREF.value), _c(RowConst.S_TT.value), _c(RowConst.C_KL.value)
C_C_CE, C_SEL = _c(RowConst.C_CE.value), _c(RowConst.SEL.value)
M_GIVEN, M_MUSCLE, M_OLD_CORRECT = _c(MaskMode.GIVEN.value), _c(MaskMode.MUSCLE.value), _c(MaskMode.OLD_CORRECT.value)
M_TOKEN_LIKELIHOOD, M_ALL_OLD = _c(MaskMode.TOKEN_LIKELIHOOD.value), _c(MaskMode.ALL_OLD.value)
SEL_IGNORED_C, SEL_OLD_C, SEL_NEW_C = _c(float(SEL_IGNORED)), _c(float(SEL_OLD)), _c(float(SEL_NEW))
# A row whose vocabulary fits in one block of at most this many columns is read once and kept in
# registers; longer rows are streamed in LOOP_BLOCK_V columns and read twice.
MAX_FUSED_BLOCK_V = 8192
LOOP_BLOCK_V = 4096


@triton.jit
def _max_arg_step(x, cols, V, best, arg):
    blk = tl.max(x, 0)
    blk_arg = tl.min(tl.where(x == blk, cols, V), 0).to(tl.int32)
    # strictly greater: the earlier block keeps ties (first index, as torch.argmax)
    arg = tl.where(blk > best, blk_arg, arg)
    return tl.maximum(best, blk), arg


@triton.jit
def _student_step(z, cols, V, y, best, arg, s_t, s_1, z_y, inv_t):
    new_best, arg = _max_arg_step(z, cols, V, best, arg)
    safe = tl.where(new_best == float("-inf"), 0.0, new_best)
    s_1 = s_1 * tl.exp(best - safe) + tl.sum(tl.exp(z - safe), 0)
    s_t = s_t * tl.exp((best - safe) * inv_t) + tl.sum(tl.exp((z - safe) * inv_t), 0)
    z_y += tl.sum(tl.where(cols == y, z, 0.0), 0)
    return new_best, arg, s_t, s_1, z_y


@triton.jit
def _teacher_step(x, z, cols, V, y, best, arg, s, a, s_1, x_y, inv_t, AT_ONE: tl.constexpr):
    new_best, arg = _max_arg_step(x, cols, V, best, arg)
    safe = tl.where(new_best == float("-inf"), 0.0, new_best)
    alpha = tl.exp((best - safe) * inv_t)
    e = tl.exp((x - safe) * inv_t)  # [BLOCK_V]
    s = s * alpha + tl.sum(e, 0)
    # p_t == 0 contributes 0 even where the student is -inf (0 * inf)
    a = a * alpha + tl.sum(tl.where(e == 0.0, 0.0, e * (x - z)), 0)
    if AT_ONE:
        s_1 = s_1 * tl.exp(best - safe) + tl.sum(tl.exp(x - safe), 0)
        x_y += tl.sum(tl.where(cols == y, x, 0.0), 0)
    return new_best, arg, s, a, s_1, x_y


@triton.jit
def _stats_block(z, o, w, cols, V, y, inv_t, zb, z_arg, s_st, s_s1, z_y, ob, o_arg, s_o, a_o, s_o1,
                 o_y, wb, w_arg, s_w, a_w, s_w1, w_y, HAS_NEW: tl.constexpr, OLD_AT_ONE: tl.constexpr):
    """One block of the statistics pass: the running statistics updated with columns ``cols``."""
    zb, z_arg, s_st, s_s1, z_y = _student_step(z, cols, V, y, zb, z_arg, s_st, s_s1, z_y, inv_t)
    ob, o_arg, s_o, a_o, s_o1, o_y = _teacher_step(
        o, z, cols, V, y, ob, o_arg, s_o, a_o, s_o1, o_y, inv_t, OLD_AT_ONE)
    if HAS_NEW:
        wb, w_arg, s_w, a_w, s_w1, w_y = _teacher_step(
            w, z, cols, V, y, wb, w_arg, s_w, a_w, s_w1, w_y, inv_t, False)
    return zb, z_arg, s_st, s_s1, z_y, ob, o_arg, s_o, a_o, s_o1, o_y, wb, w_arg, s_w, a_w, s_w1, w_y


@triton.jit
def _stream_row(z_row, o_row, w_row, v_lim, V, y, inv_t, BLOCK_V: tl.constexpr,
                HAS_NEW: tl.constexpr, OLD_AT_ONE: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    """Streaming statistics of one row over columns [0, v_lim), BLOCK_V at a time: maxima, first
    argmax, exp sums relative to the running maxima, teacher KL partials, label logits. With
    SINGLE_BLOCK the row is one block and its loaded values are returned too (for the gradient)."""
    NEG: tl.constexpr = float("-inf")
    cols0 = tl.arange(0, BLOCK_V)  # [BLOCK_V]
    ninf = tl.full([], NEG, tl.float32)
    zero = tl.full([], 0.0, tl.float32)
    izero = tl.full([], 0, tl.int32)
    zb, z_arg, s_st, s_s1, z_y = ninf, izero, zero, zero, zero
    ob, o_arg, s_o, a_o, s_o1, o_y = ninf, izero, zero, zero, zero, zero
    wb, w_arg, s_w, a_w, s_w1, w_y = ninf, izero, zero, zero, zero, zero
    if SINGLE_BLOCK:
        cm = cols0 < v_lim
        z = tl.load(z_row + cols0, mask=cm, other=NEG).to(tl.float32)
        o = tl.load(o_row + cols0, mask=cm, other=NEG).to(tl.float32)
        w = o
        if HAS_NEW:
            w = tl.load(w_row + cols0, mask=cm, other=NEG).to(tl.float32)
        (zb, z_arg, s_st, s_s1, z_y, ob, o_arg, s_o, a_o, s_o1, o_y, wb, w_arg, s_w, a_w, s_w1,
         w_y) = _stats_block(z, o, w, cols0, V, y, inv_t, zb, z_arg, s_st, s_s1, z_y, ob, o_arg,
                             s_o, a_o, s_o1, o_y, wb, w_arg, s_w, a_w, s_w1, w_y, HAS_NEW, OLD_AT_ONE)
    else:
        z = tl.zeros([BLOCK_V], tl.float32)
        o = z
        w = z
        for start in range(0, v_lim, BLOCK_V):
            cols = start + cols0
            cm = cols < V
            zc = tl.load(z_row + cols, mask=cm, other=NEG).to(tl.float32)
            oc = tl.load(o_row + cols, mask=cm, other=NEG).to(tl.float32)
            wc = oc
            if HAS_NEW:
                wc = tl.load(w_row + cols, mask=cm, other=NEG).to(tl.float32)
            (zb, z_arg, s_st, s_s1, z_y, ob, o_arg, s_o, a_o, s_o1, o_y, wb, w_arg, s_w, a_w, s_w1,
             w_y) = _stats_block(zc, oc, wc, cols, V, y, inv_t, zb, z_arg, s_st, s_s1, z_y, ob,
                                 o_arg, s_o, a_o, s_o1, o_y, wb, w_arg, s_w, a_w, s_w1, w_y,
                                 HAS_NEW, OLD_AT_ONE)
    return (zb, z_arg, s_st, s_s1, z_y, ob, o_arg, s_o, a_o, s_o1, o_y, wb, w_arg, s_w, a_w,
            z, o, w)


@triton.jit
def _grad_block(z, t, cols, y, zs, log_st, log_s1, ts, log_tt, c_t, c_ce, inv_t,
                HAS_CE: tl.constexpr, HAS_KL: tl.constexpr):
    if HAS_KL:
        p_s = tl.exp((z - zs) * inv_t - log_st)
        p_t = tl.exp((t - ts) * inv_t - log_tt)
        g = c_t * (p_s - p_t)
    else:
        g = tl.zeros_like(z)
    if HAS_CE:
        p_1 = tl.exp(z - zs - log_s1)
        g += c_ce * (p_1 - tl.where(cols == y, 1.0, 0.0))
    return g


@triton.jit
def _compat_loss_kernel(
    z_ptr, z_sb, z_st,
    o_ptr, o_sb, o_st,
    w_ptr, w_sb, w_st,
    g_ptr, g_sb, g_st,
    y_ptr, m_ptr, scale_ptr, out_ptr,
    T_LEN, V, inv_t, kl_weight, ce_weight, ignore_index,
    HAS_NEW: tl.constexpr, MASK_MODE: tl.constexpr, OLD_AT_ONE: tl.constexpr,
    HAS_GRAD: tl.constexpr, HAS_KL: tl.constexpr, HAS_CE: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One token row: statistics pass, mask, loss, 9 row stats, then (HAS_GRAD) the gradient.

    Bytes per valid row (e = element size): pass 1 reads V * (e_z + e_o [+ e_w]) once. With
    SINGLE_BLOCK the row stays in registers and the gradient adds only V * e_g written; otherwise
    pass 2 reads the student and the ONE teacher the mask selected again and writes the gradient:
    + V * (e_z + e_t + e_g). An ignored row reads nothing and writes V * e_g zeros (with a grad).
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // T_LEN
    t = row % T_LEN
    z_row = z_ptr + b * z_sb + t * z_st
    o_row = o_ptr + b * o_sb + t * o_st
    w_row = w_ptr + b * w_sb + t * w_st
    y = tl.load(y_ptr + row)
    active = y != ignore_index
    y_ok = (y >= 0) & (y < V)
    cols0 = tl.arange(0, BLOCK_V)  # [BLOCK_V]
    NEG: tl.constexpr = float("-inf")

    v_lim = tl.where(active, V, 0)  # an ignored row reads nothing
    (zb, z_arg, s_st, s_s1, z_y, ob, o_arg, s_o, a_o, s_o1, o_y, wb, w_arg, s_w, a_w, z, o,
     w) = _stream_row(z_row, o_row, w_row, v_lim, V, y, inv_t, BLOCK_V, HAS_NEW, OLD_AT_ONE,
                      SINGLE_BLOCK)

    nan = float("nan")
    z_y = tl.where(y_ok, z_y, nan)
    zs = tl.where(zb == NEG, 0.0, zb)
    os_ = tl.where(ob == NEG, 0.0, ob)
    ws = tl.where(wb == NEG, 0.0, wb)
    log_st = tl.log(s_st)
    log_s1 = tl.log(s_s1)
    log_so = tl.log(s_o)
    # KL = E_pt[(x - z)/T] - lse_t + lse_s, ordered so that the large logit offsets cancel first
    kl_old = (a_o / s_o - (os_ - zs)) * inv_t - log_so + log_st
    ce = (zs - z_y) + log_s1
    kl_new = 0.0
    if HAS_NEW:
        log_sw = tl.log(s_w)
        kl_new = (a_w / s_w - (ws - zs)) * inv_t - log_sw + log_st

    if MASK_MODE == M_GIVEN:
        to_old = tl.load(m_ptr + row) != 0
    elif MASK_MODE == M_MUSCLE:
        to_old = z_arg != y
    elif MASK_MODE == M_OLD_CORRECT:
        to_old = o_arg == y
    elif MASK_MODE == M_TOKEN_LIKELIHOOD:
        to_old = (z_y - zs - log_s1) < (o_y - os_ - tl.log(s_o1))
    else:  # M_ALL_OLD
        to_old = y == y

    loss = 0.0
    if HAS_KL:
        loss += kl_weight * tl.where(to_old, kl_old, kl_new)
    if HAS_CE:
        loss += ce_weight * ce
    loss = tl.where(y_ok, loss, nan)

    out = out_ptr + row * N_STATS_C
    tl.store(out + S_LOSS, tl.where(active, loss, 0.0))
    tl.store(out + S_TO_OLD, tl.where(active & to_old, 1.0, 0.0))
    tl.store(out + S_HIT_STUDENT, tl.where(active & (z_arg == y), 1.0, 0.0))
    tl.store(out + S_HIT_OLD, tl.where(active & (o_arg == y), 1.0, 0.0))
    if HAS_NEW:
        tl.store(out + S_HIT_NEW, tl.where(active & (w_arg == y), 1.0, 0.0))
    else:
        tl.store(out + S_HIT_NEW, 0.0)
    tl.store(out + S_KL_OLD, tl.where(active, kl_old, 0.0))
    tl.store(out + S_KL_NEW, tl.where(active, kl_new, 0.0))
    tl.store(out + S_CE, tl.where(active, ce, 0.0))
    if OLD_AT_ONE:
        tl.store(out + S_OLD_LOGP, tl.where(active, (o_y - os_) - tl.log(s_o1), 0.0))
    else:
        tl.store(out + S_OLD_LOGP, 0.0)

    if HAS_GRAD:
        scale = tl.load(scale_ptr)
        scale = tl.where(y_ok, scale, nan)
        use_old = to_old
        if HAS_NEW:
            use_new = to_old == 0
        else:
            use_new = to_old != to_old
        c_t = tl.where(use_old | use_new, kl_weight * scale * inv_t, 0.0)
        if not HAS_KL:
            c_t = 0.0
        c_ce = ce_weight * scale
        ts = tl.where(use_old, os_, ws)
        log_tt = tl.where(use_old, log_so, 0.0)
        if HAS_NEW:
            log_tt = tl.where(use_new, log_sw, log_tt)
        g_row = g_ptr + b * g_sb + t * g_st
        o_lim = tl.where(active & use_old, V, 0)
        w_lim = tl.where(active & use_new, V, 0)
        if SINGLE_BLOCK:
            tt = tl.where(use_old, o, NEG)
            if HAS_NEW:
                tt = tl.where(use_new, w, tt)
            g = _grad_block(z, tt, cols0, y, zs, log_st, log_s1, ts, log_tt, c_t, c_ce, inv_t,
                            HAS_CE, HAS_KL)
            g = tl.where(active, g, 0.0)
            tl.store(g_row + cols0, g.to(g_ptr.dtype.element_ty), mask=cols0 < V)
        else:
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                cm = cols < V
                z = tl.load(z_row + cols, mask=cols < v_lim, other=NEG).to(tl.float32)
                # only the selected teacher's row is read again
                tt = tl.load(o_row + cols, mask=cols < o_lim, other=NEG).to(tl.float32)
                if HAS_NEW:
                    tn = tl.load(w_row + cols, mask=cols < w_lim, other=NEG).to(tl.float32)
                    tt = tl.where(use_new, tn, tt)
                g = _grad_block(z, tt, cols, y, zs, log_st, log_s1, ts, log_tt, c_t, c_ce, inv_t,
                                HAS_CE, HAS_KL)
                g = tl.where(active, g, 0.0)
                tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _compat_partials_kernel(
    z_ptr, z_sb, z_st,
    o_ptr, o_sb, o_st,
    w_ptr, w_sb, w_st,
    y_ptr, out_ptr,
    T_LEN, V, inv_t, ignore_index,
    HAS_NEW: tl.constexpr, OLD_AT_ONE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One token row of one vocabulary slice: the 15 partial statistics (README.md, vocabulary
    parallel), the statistics pass of ``_compat_loss_kernel`` without the finalisation.

    Reads V * (e_z + e_o [+ e_w]) per valid row once, in blocks of BLOCK_V columns (one block when
    the row fits: the same streaming steps, one iteration); an ignored row reads nothing and
    writes 15 zeros. A label outside [0, V) is another rank's: its label columns are 0.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // T_LEN
    tok = row % T_LEN
    z_row = z_ptr + b * z_sb + tok * z_st
    o_row = o_ptr + b * o_sb + tok * o_st
    w_row = w_ptr + b * w_sb + tok * w_st
    y = tl.load(y_ptr + row)
    active = y != ignore_index
    own = (y >= 0) & (y < V)
    v_lim = tl.where(active, V, 0)  # an ignored row reads nothing
    (zb, z_arg, s_st, s_s1, z_y, ob, o_arg, s_o, a_o, s_o1, o_y, wb, w_arg, s_w, a_w, _, _,
     _) = _stream_row(z_row, o_row, w_row, v_lim, V, y, inv_t, BLOCK_V, HAS_NEW, OLD_AT_ONE, False)

    # a label that is not this slice's may have matched a masked column past V: drop it
    z_y = tl.where(own, z_y, 0.0)
    out = out_ptr + row * N_PARTIALS_C
    tl.store(out + P_Z_MAX, tl.where(active, zb, 0.0))
    tl.store(out + P_Z_ARG, tl.where(active, z_arg.to(tl.float32), 0.0))
    tl.store(out + P_Z_ST, tl.where(active, s_st, 0.0))
    tl.store(out + P_Z_S1, tl.where(active, s_s1, 0.0))
    tl.store(out + P_Z_Y, tl.where(active, z_y, 0.0))
    tl.store(out + P_O_MAX, tl.where(active, ob, 0.0))
    tl.store(out + P_O_ARG, tl.where(active, o_arg.to(tl.float32), 0.0))
    tl.store(out + P_O_S, tl.where(active, s_o, 0.0))
    # the row kernel scales A by k at the end; the partials carry it scaled
    tl.store(out + P_O_A, tl.where(active, a_o * inv_t, 0.0))
    if OLD_AT_ONE:
        tl.store(out + P_O_S1, tl.where(active, s_o1, 0.0))
        tl.store(out + P_O_Y, tl.where(active & own, o_y, 0.0))
    else:
        tl.store(out + P_O_S1, 0.0)
        tl.store(out + P_O_Y, 0.0)
    if HAS_NEW:
        tl.store(out + P_W_MAX, tl.where(active, wb, 0.0))
        tl.store(out + P_W_ARG, tl.where(active, w_arg.to(tl.float32), 0.0))
        tl.store(out + P_W_S, tl.where(active, s_w, 0.0))
        tl.store(out + P_W_A, tl.where(active, a_w * inv_t, 0.0))
    else:
        tl.store(out + P_W_MAX, 0.0)
        tl.store(out + P_W_ARG, 0.0)
        tl.store(out + P_W_S, 0.0)
        tl.store(out + P_W_A, 0.0)


@triton.jit
def _compat_grad_rows_kernel(
    z_ptr, z_sb, z_st,
    o_ptr, o_sb, o_st,
    w_ptr, w_sb, w_st,
    g_ptr, g_sb, g_st,
    y_ptr, c_ptr,
    T_LEN, V, inv_t,
    HAS_NEW: tl.constexpr, HAS_KL: tl.constexpr, HAS_CE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One token row of one vocabulary slice: its gradient from the 8 row constants.

    consts: zref, S_t, S_1, tref, S_tt, c_kl, c_ce, sel (-1 ignored, 0 no teacher, 1 old, 2 new).
    Reads V * (e_z [+ e_t]) and writes V * e_g per valid row, block by block (each block read
    before it is written, so ``g`` may be the student); an ignored row reads nothing and writes
    V * e_g zeros.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // T_LEN
    tok = row % T_LEN
    z_row = z_ptr + b * z_sb + tok * z_st
    o_row = o_ptr + b * o_sb + tok * o_st
    w_row = w_ptr + b * w_sb + tok * w_st
    g_row = g_ptr + b * g_sb + tok * g_st
    y = tl.load(y_ptr + row)
    c = c_ptr + row * N_ROW_CONSTS_C
    zs = tl.load(c + C_ZREF)
    log_st = tl.log(tl.load(c + C_S_T))
    log_s1 = tl.log(tl.load(c + C_S_1))
    c_kl = tl.load(c + C_C_KL)
    c_ce = tl.load(c + C_C_CE)
    sel = tl.load(c + C_SEL)
    active = sel != SEL_IGNORED_C
    use_old = sel == SEL_OLD_C
    use_new = sel == SEL_NEW_C
    has_t = use_old
    if HAS_NEW:
        has_t = use_old | use_new
    # without a teacher term the teacher reads as -inf and p_t = exp(-inf - 0) = 0 exactly,
    # whatever the caller left in tref and S_tt
    ts = tl.where(has_t, tl.load(c + C_TREF), 0.0)
    log_tt = tl.where(has_t, tl.log(tl.load(c + C_S_TT)), 0.0)
    v_lim = tl.where(active, V, 0)  # an ignored row reads nothing
    o_lim = tl.where(active & use_old, V, 0)
    w_lim = tl.where(active & use_new, V, 0)
    cols0 = tl.arange(0, BLOCK_V)
    NEG: tl.constexpr = float("-inf")
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        z = tl.load(z_row + cols, mask=cols < v_lim, other=NEG).to(tl.float32)
        tt = tl.full([BLOCK_V], NEG, tl.float32)
        if HAS_KL:
            # only the selected teacher's row is read
            tt = tl.load(o_row + cols, mask=cols < o_lim, other=NEG).to(tl.float32)
            if HAS_NEW:
                tn = tl.load(w_row + cols, mask=cols < w_lim, other=NEG).to(tl.float32)
                tt = tl.where(use_new, tn, tt)
        g = _grad_block(z, tt, cols, y, zs, log_st, log_s1, ts, log_tt, c_kl, c_ce, inv_t,
                        HAS_CE, HAS_KL)
        g = tl.where(active, g, 0.0)
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _scale_rows_kernel(g_ptr, g_sb, g_st, go_ptr, T_LEN, V, PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if PER_ROW:
        go = tl.load(go_ptr + row)
    else:
        go = tl.load(go_ptr)
    # an upstream gradient of exactly 1 (the usual loss.backward()) costs no pass over the row
    v_end = tl.where(go == 1.0, 0, V)
    g_row = g_ptr + (row // T_LEN) * g_sb + (row % T_LEN) * g_st
    for start in range(0, v_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        cm = cols < V
        g = tl.load(g_row + cols, mask=cm).to(tl.float32)
        tl.store(g_row + cols, (g * go).to(g_ptr.dtype.element_ty), mask=cm)


def _on_device_of(t: torch.Tensor):
    """Launch on ``t``'s GPU, whichever device is current (Triton launches on the current one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def single_block(vocab: int) -> bool:
    """Whether a row of ``vocab`` columns is kept in registers (read once) by the row kernel."""
    return triton.next_power_of_2(vocab) <= MAX_FUSED_BLOCK_V


def design_bytes(n_rows: int, vocab: int, elem: int, *, teachers: int, grad: bool,
                 teacher_rows: Optional[int] = None) -> int:
    """DRAM bytes ``_compat_loss_kernel`` moves by its design for ``n_rows`` valid rows of
    ``vocab`` columns, ``elem`` bytes an element, ``teachers`` teacher rows given (1 or 2).

    Statistics pass: student + every given teacher read once, ``N_STATS`` float32 written. With a
    gradient, a one-block row writes it only; a longer row reads the student again and writes the
    gradient, and ``teacher_rows`` rows (default: all) read their selected teacher again.
    """
    stats = n_rows * vocab * elem * (1 + teachers) + n_rows * N_STATS * 4
    if not grad:
        return stats
    if single_block(vocab):
        return stats + n_rows * vocab * elem
    teacher_rows = n_rows if teacher_rows is None else teacher_rows
    return stats + n_rows * vocab * 2 * elem + teacher_rows * vocab * elem


def _blocks(vocab: int):
    block = triton.next_power_of_2(vocab)
    if block <= MAX_FUSED_BLOCK_V:
        return True, block
    return False, LOOP_BLOCK_V


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def compat_loss_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logits: torch.Tensor,
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
) -> torch.Tensor:
    """Launch ``_compat_loss_kernel`` over the rows of [B, T, V] inputs; returns [B*T, 9] row stats.

    Bytes moved per valid row: ``V * (e_z + e_o + e_w)`` read once; with a gradient, rows of at
    most ``MAX_FUSED_BLOCK_V`` columns add only ``V * e_g`` written, longer rows add
    ``V * (e_z + e_t + e_g)`` (student and the one selected teacher read again, gradient written).
    An ignored row costs its gradient write of zeros only. Plus 72 bytes of row stats per row.
    """
    B, T, V = logits.shape
    n = B * T
    out = torch.empty((n, N_STATS), dtype=torch.float32, device=logits.device)
    if n == 0:
        return out
    single, block = _blocks(V)
    w = new_logits if new_logits is not None else old_logits
    g = grad if grad is not None else logits
    with _on_device_of(logits):
        _compat_loss_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1),
            old_logits, old_logits.stride(0), old_logits.stride(1),
            w, w.stride(0), w.stride(1),
            g, g.stride(0), g.stride(1),
            labels, mask if mask is not None else labels, scale, out,
            T, V, float(inv_temperature), float(kl_weight), float(ce_weight), int(ignore_index),
            HAS_NEW=new_logits is not None, MASK_MODE=int(mask_mode),
            OLD_AT_ONE=bool(old_label_logprob or mask_mode == MaskMode.TOKEN_LIKELIHOOD),
            HAS_GRAD=grad is not None, HAS_KL=kl_weight != 0, HAS_CE=ce_weight != 0,
            SINGLE_BLOCK=single, BLOCK_V=block, num_warps=_warps(block),
        )
    return out


def compat_partials_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logits: torch.Tensor,
    new_logits: Optional[torch.Tensor],
    *,
    inv_temperature: float,
    ignore_index: int,
    old_at_one: bool,
) -> torch.Tensor:
    """Launch ``_compat_partials_kernel``: float32 [B*T, 15] partial statistics of this rank's
    vocabulary slice (labels are local ids; README.md, vocabulary parallel).

    Bytes moved per valid row: ``V * (e_z + e_o [+ e_w])`` read once, 60 bytes written.
    """
    B, T, V = logits.shape
    n = B * T
    out = torch.empty((n, N_PARTIALS), dtype=torch.float32, device=logits.device)
    if n == 0:
        return out
    _, block = _blocks(V)
    w = new_logits if new_logits is not None else old_logits
    with _on_device_of(logits):
        _compat_partials_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1),
            old_logits, old_logits.stride(0), old_logits.stride(1),
            w, w.stride(0), w.stride(1),
            labels, out,
            T, V, float(inv_temperature), int(ignore_index),
            HAS_NEW=new_logits is not None, OLD_AT_ONE=bool(old_at_one),
            BLOCK_V=block, num_warps=_warps(block),
        )
    return out


def compat_grad_rows_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logits: torch.Tensor,
    new_logits: Optional[torch.Tensor],
    grad: torch.Tensor,
    consts: torch.Tensor,
    *,
    inv_temperature: float,
    has_kl: bool,
    has_ce: bool,
) -> None:
    """Launch ``_compat_grad_rows_kernel``: ``grad`` (may be ``logits``) gets this rank's slice of
    d loss_i / d logits from the float32 [B*T, 8] row constants (README.md, vocabulary parallel).

    Bytes moved per valid row: ``V * (e_z + e_t + e_g)`` (the one selected teacher only, none
    without a KL term or a teacher), plus 32 bytes of constants; an ignored row writes zeros only.
    """
    B, T, V = logits.shape
    n = B * T
    if n == 0:
        return
    if consts.dtype != torch.float32 or not consts.is_contiguous():
        raise ValueError(f"consts must be a contiguous float32 [B*T, {N_ROW_CONSTS}] tensor")
    _, block = _blocks(V)
    w = new_logits if new_logits is not None else old_logits
    with _on_device_of(logits):
        _compat_grad_rows_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1),
            old_logits, old_logits.stride(0), old_logits.stride(1),
            w, w.stride(0), w.stride(1),
            grad, grad.stride(0), grad.stride(1),
            labels, consts,
            T, V, float(inv_temperature),
            HAS_NEW=new_logits is not None, HAS_KL=bool(has_kl), HAS_CE=bool(has_ce),
            BLOCK_V=block, num_warps=_warps(block),
        )


def scale_rows_triton(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad[b, t, :] *= grad_output (0-dim, or [B*T] per row), skipping rows where it equals 1."""
    B, T, V = grad.shape
    if B * T == 0:
        return
    block = min(triton.next_power_of_2(V), LOOP_BLOCK_V)
    go = grad_output.reshape(-1).to(torch.float32).contiguous()
    with _on_device_of(grad):
        _scale_rows_kernel[(B * T,)](
            grad, grad.stride(0), grad.stride(1), go, T, V,
            PER_ROW=grad_output.dim() > 0, BLOCK_V=block, num_warps=_warps(block),
        )
