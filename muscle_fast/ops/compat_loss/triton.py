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
    SparseCol,
    SparseRows,
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
SC_TAIL, SC_ARGMAX = _c(SparseCol.TAIL.value), _c(SparseCol.ARGMAX.value)
SC_LABEL_LP = _c(SparseCol.LABEL_LP.value)
# A row whose vocabulary fits in one block of at most this many columns is read once and kept in
# registers; longer rows are streamed LOOP_BLOCK_V columns a loop iteration and read twice.
MAX_FUSED_BLOCK_V = 8192
LOOP_BLOCK_V = 2048


LOG2E = tl.constexpr(1.4426950408889634)
NEG_INF = tl.constexpr(float("-inf"))


# Statistics pass, per lane: every lane of a [SUB] block keeps its own running maximum, first
# argmax and sums relative to its maximum over the columns it visits (cols = start + lane, in
# increasing order), so the loop body has no reduction, no barrier and one exp per sum and
# column: of exp(old max - new max) and exp(x - new max) one is exp(0) = 1. `_lanes_reduce`
# combines the lanes once per row. Exponentials are exp2 of arguments scaled by log2(e)/T.
# A teacher's KL partial a = sum e ((x - m) - (z - zr)) holds differences to the lane maxima
# only (zr: the student lane's max, 0 while it is -inf), never a logit's absolute size.
@triton.jit
def _lane_student(z, cols, m, arg, s_t, s_1, c_t):
    """The student lane's update; also (z - zr, the rise of zr) for the teachers' KL partials,
    and (a new max?, the exp at T of the update) for the sparse teachers' tail sums."""
    up = z > m  # strictly: a lane keeps its first index on ties
    nd = -tl.abs(z - m)  # smaller minus larger (NaN only when both are -inf, or z is NaN)
    dead = z == NEG_INF
    e_t = tl.where(dead, 0.0, tl.exp2(nd * c_t))
    e_1 = tl.where(dead, 0.0, tl.exp2(nd * LOG2E))
    s_t = tl.where(up, s_t * e_t + 1.0, s_t + e_t)
    s_1 = tl.where(up, s_1 * e_1 + 1.0, s_1 + e_1)
    r0 = tl.where(m == NEG_INF, 0.0, m)
    r1 = tl.where(up, z, r0)
    return tl.where(up, z, m), tl.where(up, cols, arg), s_t, s_1, z - r1, r1 - r0, up, e_t


@triton.jit
def _lane_tail(x, up, e_t, s):
    """A sparse teacher's tail sum, relative to the student lane's maximum: the student's own exp
    at T (e_t, the student's update) where x, the student outside K, is not -inf."""
    out = x == NEG_INF
    return tl.where(up, s * e_t + tl.where(out, 0.0, 1.0), s + tl.where(out, 0.0, e_t))


@triton.jit
def _lane_teacher(x, zd, dz, cols, m, arg, s, a, s_1, c_t, AT_ONE: tl.constexpr,
                  KL: tl.constexpr = True):
    """A teacher lane's update; KL False: max and sum only (a sparse teacher's tail stream, whose
    x is the student outside K)."""
    up = x > m
    nd = -tl.abs(x - m)  # x - m, or on a new max m - x
    dead = x == NEG_INF
    e = tl.where(dead, 0.0, tl.exp2(nd * c_t))
    if KL:
        b = a + s * dz  # the student's reference rose by dz
        # the new column's term, or on a new max the terms so far rescaled; e == 0: p_t == 0
        # (also where the student is -inf: 0 * inf), or the terms so far are negligible
        q = tl.where(e == 0.0, 0.0, e * tl.where(up, b + s * nd, nd - zd))
        a = tl.where(up, q - zd, b + q)
    s = tl.where(up, s * e + 1.0, s + e)
    if AT_ONE:
        e_1 = tl.where(dead, 0.0, tl.exp2(nd * LOG2E))
        s_1 = tl.where(up, s_1 * e_1 + 1.0, s_1 + e_1)
    return tl.where(up, x, m), tl.where(up, cols, arg), s, a, s_1


@triton.jit
def _lanes_step(z, o, w, cols, zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw, c_t,
                HAS_NEW: tl.constexpr, OLD_AT_ONE: tl.constexpr, OLD_SPARSE: tl.constexpr = False,
                NEW_SPARSE: tl.constexpr = False):
    """One block of every stream; a sparse teacher's sum slot holds its tail sum relative to the
    student's lane maximum (o or w is then the student with K's columns at -inf, `_outside`)."""
    zm, za, zst, zs1, zd, dz, up, e_t = _lane_student(z, cols, zm, za, zst, zs1, c_t)
    if OLD_SPARSE:
        so = _lane_tail(o, up, e_t, so)
    else:
        om, oa, so, ao, so1 = _lane_teacher(o, zd, dz, cols, om, oa, so, ao, so1, c_t,
                                            OLD_AT_ONE)
    if HAS_NEW:
        if NEW_SPARSE:
            sw = _lane_tail(w, up, e_t, sw)
        else:
            wm, wa, sw, aw, _ = _lane_teacher(w, zd, dz, cols, wm, wa, sw, aw, sw, c_t, False)
    return zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw


@triton.jit
def _outside(z, cols, ids, n_ids, p, c_end):
    """z with the columns that are ids of a sparse teacher set to -inf (what its tail stream
    sees): walks its ascending ids from position p while they lie below c_end (a block's end);
    returns (that block, the next position). One uniform load per id and per block."""
    nxt = tl.load(ids + tl.minimum(p, n_ids - 1))
    while (p < n_ids) & (nxt < c_end):
        # the block itself is carried (a carried boolean mask costs a shared-memory round trip)
        z = tl.where(cols == nxt, NEG_INF, z)
        p += 1
        nxt = tl.load(ids + tl.minimum(p, n_ids - 1))
    return z, p


@triton.jit
def _inside(z, cols, ids, lp, p, c_start):
    """The columns of a block that are ids of the selected sparse teacher, and their p_j (0
    elsewhere): walks its ascending ids down from position p while they are >= c_start (the
    gradient pass visits the blocks from the last); returns (mask, p_j, the next position)."""
    # -1 or NaN: not an id (p_j >= 0); derived from the block z to keep its register layout
    pj = z * 0.0 - 1.0
    nxt = tl.load(ids + tl.maximum(p, 0))
    while (p >= 0) & (nxt >= c_start):
        pj = tl.where(cols == nxt, tl.exp(tl.load(lp + p)), pj)
        p -= 1
        nxt = tl.load(ids + tl.maximum(p, 0))
    return pj >= 0.0, pj, p


@triton.jit
def _lanes_max(m, arg, m2, arg2, TWO: tl.constexpr):
    """Row max, first argmax (the lowest column among the lanes holding the max) and the
    reference the sums are taken against (0 for a row that is -inf everywhere); TWO: over the
    lanes of two blocks (m, arg) and (m2, arg2)."""
    best = tl.max(m, 0)
    if TWO:
        best = tl.maximum(best, tl.max(m2, 0))
    arg = tl.min(tl.where(m == best, arg, 2147483647), 0)
    if TWO:
        arg = tl.minimum(arg, tl.min(tl.where(m2 == best, arg2, 2147483647), 0))
    return best, arg, tl.where(best == NEG_INF, 0.0, best)


@triton.jit
def _lanes_sum(s, m, s2, m2, ref, c, TWO: tl.constexpr):
    """A sum over the row from lane sums relative to the lane maxima m (exp2 scale c); TWO: the
    lanes of two blocks."""
    total = tl.sum(s * tl.exp2((m - ref) * c), 0)
    if TWO:
        total += tl.sum(s2 * tl.exp2((m2 - ref) * c), 0)
    return total


@triton.jit
def _lane_kl(a, s, m, zm, ref, zref, c):
    """A lane's KL partial rescaled from its maxima (m teacher, zm student) to the row's
    references ref and zref (0 for a lane whose factor is 0: no mass, or negligible)."""
    f = tl.exp2((m - ref) * c)
    zr = tl.where(zm == NEG_INF, 0.0, zm)
    return tl.where(f == 0.0, 0.0, f * (a + s * ((m - ref) - (zr - zref))))


@triton.jit
def _add2(a, b, c, d):
    return a + c, b + d


@triton.jit
def _block_sum_kl(x, z, ref, zref, c):
    """A teacher's (sum e, KL partial sum e ((x - ref) - (z - zref))) over a block holding one
    column a lane (`_one_block_state`), e = exp2((x - ref) c), terms with e == 0 left out; one
    reduction for both (e dies at once: the one-block row's registers are full)."""
    e = tl.exp2((x - ref) * c)
    return tl.reduce((e, tl.where(e == 0.0, 0.0, e * ((x - ref) - (z - zref)))), 0, _add2)


@triton.jit
def _teacher_sums(x, z, x2, z2, m, m2, s, s2, a, zm, ref, zref, c, SINGLE_BLOCK: tl.constexpr,
                  TWO: tl.constexpr):
    """A teacher's row sum S and KL partial A relative to the row's references: from the block
    itself (SINGLE_BLOCK; TWO: and its rest block), else from the lanes' running state."""
    if SINGLE_BLOCK:
        total, kl = _block_sum_kl(x, z, ref, zref, c)
        if TWO:
            total2, kl2 = _block_sum_kl(x2, z2, ref, zref, c)
            total += total2
            kl += kl2
    else:
        total = _lanes_sum(s, m, s2, m2, ref, c, False)
        kl = tl.sum(_lane_kl(a, s, m, zm, ref, zref, c), 0)
    return total, kl


@triton.jit
def _peel(row):
    """Columns before the first 16-byte boundary of ``row`` (a pointer to its column 0): the
    head a row of odd length is read by masked before its aligned main loop (0 .. 16/e - 1)."""
    e: tl.constexpr = row.dtype.element_ty.primitive_bitwidth // 8
    return ((16 - row.to(tl.int64) % 16) % 16 // e).to(tl.int32)


@triton.jit
def _at(row, cols, ALIGNED: tl.constexpr):
    """Pointers to ``cols`` of ``row``; ALIGNED tells the compiler that the block starts on a
    16-byte boundary (true of every main-loop block after the head peel: the launcher checks
    that the one peel of the student row aligns every other row read or written)."""
    ptrs = row + cols
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, [16])
    return ptrs


# A row kept in one block with PEEL: its aligned middle, columns [h, h + n_vec) (n_vec a multiple
# of 8), in the [SUB] block's lanes 0.. (vector loads), and the rest, the head [0, h) and the tail
# [h + n_vec, V) (at most 7 + 7 columns), in a [REST] block (element loads).
REST = tl.constexpr(16)


@triton.jit
def _one_block_cols(z_row, V, SUB: tl.constexpr):
    """(h, n_vec, middle's columns [SUB], rest's columns [REST]) of a peeled one-block row."""
    h = _peel(z_row)
    n_vec = tl.where(V > h, (V - h) // 8 * 8, 0)
    r = tl.arange(0, REST)
    return h, n_vec, h + tl.arange(0, SUB), tl.where(r < h, r, r + n_vec)


@triton.jit
def _one_block_state(z, o, w, cols):
    """Per-lane statistics of a block holding one column a lane: each lane's max is its value,
    its sums 1 (0 where -inf); the KL partials are taken from the block itself (`_block_kl`)."""
    zero = tl.zeros_like(z)
    zs = tl.where(z == NEG_INF, 0.0, 1.0)
    os_ = tl.where(o == NEG_INF, 0.0, 1.0)
    ws = tl.where(w == NEG_INF, 0.0, 1.0)
    return (z, cols, zs, zs, o, cols, os_, zero, os_, w, cols, ws, zero)


@triton.jit
def _load_block(row, cols, lim, TAIL: tl.constexpr, ALIGNED: tl.constexpr):
    if TAIL:
        x = tl.load(row + cols, mask=cols < lim, other=NEG_INF)
    else:
        x = tl.load(_at(row, cols, ALIGNED))
    return x.to(tl.float32)


@triton.jit
def _stats_pair(z_row, o_row, w_row, c0, v_lim, zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw,
                aw, c_t, SUB: tl.constexpr, HAS_NEW: tl.constexpr, OLD_AT_ONE: tl.constexpr,
                TAIL: tl.constexpr, ALIGNED: tl.constexpr, start=0, o_ids=None, o_k=0, po=0,
                w_ids=None, w_k=0, pw=0, OLD_SPARSE: tl.constexpr = False,
                NEW_SPARSE: tl.constexpr = False):
    """Two [SUB] blocks of the statistics pass at columns c0 and c0 + SUB (c0 = start + lanes),
    every load first; masked only in the TAIL (the main loop's blocks lie inside the row). A
    sparse teacher reads no row: its blocks are the student's outside its ids (`_outside`)."""
    c1 = c0 + SUB
    z0 = _load_block(z_row, c0, v_lim, TAIL, ALIGNED)
    z1 = _load_block(z_row, c1, v_lim, TAIL, ALIGNED)
    if OLD_SPARSE:
        o0, po = _outside(z0, c0, o_ids, o_k, po, start + SUB)
        o1, po = _outside(z1, c1, o_ids, o_k, po, start + 2 * SUB)
    else:
        o0 = _load_block(o_row, c0, v_lim, TAIL, ALIGNED)
        o1 = _load_block(o_row, c1, v_lim, TAIL, ALIGNED)
    w0 = o0
    w1 = o1
    if HAS_NEW:
        if NEW_SPARSE:
            w0, pw = _outside(z0, c0, w_ids, w_k, pw, start + SUB)
            w1, pw = _outside(z1, c1, w_ids, w_k, pw, start + 2 * SUB)
        else:
            w0 = _load_block(w_row, c0, v_lim, TAIL, ALIGNED)
            w1 = _load_block(w_row, c1, v_lim, TAIL, ALIGNED)
    zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw = _lanes_step(
        z0, o0, w0, c0, zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw, c_t,
        HAS_NEW, OLD_AT_ONE, OLD_SPARSE, NEW_SPARSE)
    (zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw) = _lanes_step(
        z1, o1, w1, c1, zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw, c_t,
        HAS_NEW, OLD_AT_ONE, OLD_SPARSE, NEW_SPARSE)
    return zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw, po, pw


@triton.jit
def _stream_row(z_row, o_row, w_row, v_lim, V, inv_t, SUB: tl.constexpr, HAS_NEW: tl.constexpr,
                OLD_AT_ONE: tl.constexpr, SINGLE_BLOCK: tl.constexpr, PEEL: tl.constexpr,
                o_ids=None, o_k=0, w_ids=None, w_k=0, OLD_SPARSE: tl.constexpr = False,
                NEW_SPARSE: tl.constexpr = False):
    """Statistics of one row over columns [0, v_lim): maxima, first argmax, exp sums relative to
    the maxima (student at T and 1, teachers at T, old at 1 with OLD_AT_ONE), teacher KL partials.

    SINGLE_BLOCK: the row is one [SUB] block, kept and returned (z, o, w) for the gradient; with
    PEEL, the row's aligned middle in that block (vector loads) and its head and tail in a [REST]
    block (zr, orr, wr), returned too (`_one_block_cols`). Otherwise two [SUB] blocks a loop
    iteration, every row load at its top: an aligned main loop without masks over whole
    iterations, then one masked iteration for the tail. PEEL (rows not known to start on 16
    bytes, e.g. an odd V): first the h < 16/e columns before the student row's first 16-byte
    boundary, masked, so that the main loop starts on it and keeps vector loads. Every lane
    still visits its columns in increasing order (head, main loop, tail).

    OLD_SPARSE / NEW_SPARSE (loop path only): that teacher's ids o_ids / w_ids (o_k / w_k of
    them, ascending) instead of its row; its slots return its tail stream, the max and sum over
    the student's columns outside the ids (README.md, "Sparse teachers").
    """
    lanes = tl.arange(0, SUB)  # [SUB]
    c_t = inv_t * LOG2E
    TWO: tl.constexpr = SINGLE_BLOCK and PEEL
    if SINGLE_BLOCK:
        if PEEL:
            h, n_vec, cols, rcols = _one_block_cols(z_row, V, SUB)
            mid = lanes < tl.where(v_lim > 0, n_vec, 0)  # nothing of an ignored row
            z = tl.load(_at(z_row, cols, True), mask=mid, other=NEG_INF).to(tl.float32)
            o = tl.load(_at(o_row, cols, True), mask=mid, other=NEG_INF).to(tl.float32)
            zr = _load_block(z_row, rcols, v_lim, True, False)
            orr = _load_block(o_row, rcols, v_lim, True, False)
            w = o
            wr = orr
            if HAS_NEW:
                w = tl.load(_at(w_row, cols, True), mask=mid, other=NEG_INF).to(tl.float32)
                wr = _load_block(w_row, rcols, v_lim, True, False)
            (zm2, za2, zst2, zs12, om2, oa2, so2, ao2, so12, wm2, wa2, sw2,
             aw2) = _one_block_state(zr, orr, wr, rcols)
        else:
            cols = lanes
            z = _load_block(z_row, cols, v_lim, True, False)
            o = _load_block(o_row, cols, v_lim, True, False)
            w = o
            if HAS_NEW:
                w = _load_block(w_row, cols, v_lim, True, False)
        zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw = _one_block_state(z, o, w, cols)
    else:
        zm = tl.full([SUB], NEG_INF, tl.float32)
        za = tl.zeros([SUB], tl.int32)
        zst = tl.zeros([SUB], tl.float32)
        zs1, om, oa, so, ao, so1, wm, wa, sw, aw = zst, zm, za, zst, zst, zst, zm, za, zst, zst
        h = 0
        po = 0  # the next of the sparse teachers' ids
        pw = 0
        if PEEL:
            h = tl.minimum(_peel(z_row), v_lim)  # 0 for an ignored row (v_lim = 0)
            z = _load_block(z_row, lanes, h, True, False)
            if OLD_SPARSE:
                o, po = _outside(z, lanes, o_ids, o_k, po, h)
            else:
                o = _load_block(o_row, lanes, h, True, False)
            w = o
            if HAS_NEW:
                if NEW_SPARSE:
                    w, pw = _outside(z, lanes, w_ids, w_k, pw, h)
                else:
                    w = _load_block(w_row, lanes, h, True, False)
            zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw = _lanes_step(
                z, o, w, lanes, zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw, c_t,
                HAS_NEW, OLD_AT_ONE, OLD_SPARSE, NEW_SPARSE)
        n_main = (v_lim - h) // (2 * SUB)
        for i in range(n_main):
            start = h + i * (2 * SUB)
            zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw, po, pw = _stats_pair(
                z_row, o_row, w_row, start + lanes, v_lim, zm, za, zst, zs1, om, oa,
                so, ao, so1, wm, wa, sw, aw, c_t, SUB, HAS_NEW, OLD_AT_ONE, False, PEEL, start,
                o_ids, o_k, po, w_ids, w_k, pw, OLD_SPARSE, NEW_SPARSE)
        # the tail: fewer than 2 * SUB columns, masked
        start = h + n_main * (2 * SUB)
        zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw, po, pw = _stats_pair(
            z_row, o_row, w_row, start + lanes, v_lim, zm, za, zst, zs1, om, oa,
            so, ao, so1, wm, wa, sw, aw, c_t, SUB, HAS_NEW, OLD_AT_ONE, True, False, start,
            o_ids, o_k, po, w_ids, w_k, pw, OLD_SPARSE, NEW_SPARSE)
        z = zm  # unused without SINGLE_BLOCK
        o = zm
        w = zm
    if not TWO:  # no second block: its names stand for the first (unused)
        zr, orr, wr, rcols = zm, zm, zm, za
        zm2, za2, zst2, zs12, om2, oa2, so2, ao2, so12, wm2, wa2, sw2, aw2 = (
            zm, za, zst, zs1, om, oa, so, ao, so1, wm, wa, sw, aw)
    zb, z_arg, zref = _lanes_max(zm, za, zm2, za2, TWO)
    s_st = _lanes_sum(zst, zm, zst2, zm2, zref, c_t, TWO)
    s_s1 = _lanes_sum(zs1, zm, zs12, zm2, zref, LOG2E, TWO)
    ob, o_arg, oref = _lanes_max(om, oa, om2, oa2, TWO)
    s_o, a_o = _teacher_sums(o, z, orr, zr, om, om2, so, so2, ao, zm, oref, zref, c_t,
                             SINGLE_BLOCK, TWO)
    if OLD_SPARSE:  # the tail sum, relative to the student's maximum (its reference)
        ob = zb
        s_o = _lanes_sum(so, zm, so2, zm2, zref, c_t, TWO)
    s_o1 = 0.0
    if OLD_AT_ONE:
        s_o1 = _lanes_sum(so1, om, so12, om2, oref, LOG2E, TWO)
    wb = tl.full([], NEG_INF, tl.float32)
    w_arg = tl.full([], 0, tl.int32)
    s_w = tl.full([], 0.0, tl.float32)
    a_w = s_w
    if HAS_NEW:
        wb, w_arg, wref = _lanes_max(wm, wa, wm2, wa2, TWO)
        s_w, a_w = _teacher_sums(w, z, wr, zr, wm, wm2, sw, sw2, aw, zm, wref, zref, c_t,
                                 SINGLE_BLOCK, TWO)
        if NEW_SPARSE:
            wb = zb
            s_w = _lanes_sum(sw, zm, sw2, zm2, zref, c_t, TWO)
    return (zb, z_arg, s_st, s_s1, ob, o_arg, s_o, a_o, s_o1, wb, w_arg, s_w, a_w, z, o, w, zr,
            orr, wr)


@triton.jit
def _grad_block(z, t, cols, y, zs, l2_st, l2_s1, ts, l2_tt, c_t, c_ce, k2,
                HAS_CE: tl.constexpr, HAS_KL: tl.constexpr, mem=None, pj=None,
                SPARSE: tl.constexpr = False):
    """c_t (softmax(z/T) - p_t) + c_ce (softmax(z) - onehot(y)) on one block; l2_* = log2 S.
    SPARSE: p_t is pj on the columns in mem (the selected sparse teacher's ids)."""
    if HAS_KL:
        p_s = tl.exp2((z - zs) * k2 - l2_st)
        p_t = tl.exp2((t - ts) * k2 - l2_tt)
        if SPARSE:
            p_t = tl.where(mem, pj, p_t)
        g = c_t * (p_s - p_t)
    else:
        g = tl.zeros_like(z)
    if HAS_CE:
        p_1 = tl.exp2((z - zs) * LOG2E - l2_s1)
        g += c_ce * (p_1 - tl.where(cols == y, 1.0, 0.0))
    return g


@triton.jit
def _cols_mask(cols, lim, TAIL: tl.constexpr):
    """cols < lim for lim in {0, V}: per column in the TAIL; inside the row (the main loop) one
    row-wide predicate, which keeps a vector of columns uniform whatever V is."""
    if TAIL:
        return cols < lim
    return (tl.zeros_like(cols) + lim) > 0


@triton.jit
def _one_block_grad(z, o, w, cols, use_old, use_new, active, y, zs, l2_st, l2_s1, ts, l2_tt, c_t,
                    c_ce, k2, HAS_NEW: tl.constexpr, HAS_CE: tl.constexpr, HAS_KL: tl.constexpr):
    """The gradient of a block kept in registers (zeros for an ignored row)."""
    tt = tl.where(use_old, o, NEG_INF)
    if HAS_NEW:
        tt = tl.where(use_new, w, tt)
    g = _grad_block(z, tt, cols, y, zs, l2_st, l2_s1, ts, l2_tt, c_t, c_ce, k2, HAS_CE, HAS_KL)
    return tl.where(active, g, 0.0)


@triton.jit
def _teacher_block(o_row, w_row, cols, t_lim, o_lim, w_lim, use_new, HAS_NEW: tl.constexpr,
                   TAIL: tl.constexpr, ALIGNED: tl.constexpr):
    """The selected teacher's columns (-inf where not read): one load through the selected row
    when both teachers share a dtype, else each teacher read only where it is the selected one."""
    if HAS_NEW:
        if o_row.dtype == w_row.dtype:
            t = tl.load(_at(tl.where(use_new, w_row, o_row), cols, ALIGNED),
                        mask=_cols_mask(cols, t_lim, TAIL), other=NEG_INF).to(tl.float32)
        else:
            t = tl.load(_at(o_row, cols, ALIGNED), mask=_cols_mask(cols, o_lim, TAIL),
                        other=NEG_INF).to(tl.float32)
            tn = tl.load(_at(w_row, cols, ALIGNED), mask=_cols_mask(cols, w_lim, TAIL),
                         other=NEG_INF).to(tl.float32)
            t = tl.where(use_new, tn, t)
    else:
        t = tl.load(_at(o_row, cols, ALIGNED), mask=_cols_mask(cols, t_lim, TAIL),
                    other=NEG_INF).to(tl.float32)
    return t


@triton.jit
def _grad_pair(z_row, o_row, w_row, g_row, c0, s_lim, z_lim, t_lim, o_lim, w_lim, active, use_new, y,
               zs, l2_st, l2_s1, ts, l2_tt, c_t, c_ce, k2, SUB: tl.constexpr,
               HAS_NEW: tl.constexpr, HAS_CE: tl.constexpr, HAS_KL: tl.constexpr,
               TAIL: tl.constexpr, ALIGNED: tl.constexpr, start=0, sel_sparse=False, sp_ids=None,
               sp_lp=None, p=0, SPARSE: tl.constexpr = False):
    """Two [SUB] blocks of the gradient pass at columns c0 and c0 + SUB (c0 = start + lanes),
    both loads first. The stores are masked (columns < s_lim) only in the TAIL (the main loop's
    blocks lie inside the row); the *_lim are 0 or the end of the columns that may be read.
    SPARSE: on rows whose selected teacher is sparse (sel_sparse) its target is the tail target
    (the student itself as ``t``) except at its ids (`_inside`, position p); returns p."""
    c1 = c0 + SUB
    z0 = tl.load(_at(z_row, c0, ALIGNED), mask=_cols_mask(c0, z_lim, TAIL),
                 other=NEG_INF).to(tl.float32)
    z1 = tl.load(_at(z_row, c1, ALIGNED), mask=_cols_mask(c1, z_lim, TAIL),
                 other=NEG_INF).to(tl.float32)
    t0 = tl.full([SUB], NEG_INF, tl.float32)
    t1 = t0
    if HAS_KL:
        t0 = _teacher_block(o_row, w_row, c0, t_lim, o_lim, w_lim, use_new, HAS_NEW, TAIL,
                            ALIGNED)
        t1 = _teacher_block(o_row, w_row, c1, t_lim, o_lim, w_lim, use_new, HAS_NEW, TAIL,
                            ALIGNED)
    mem0 = c0 < 0
    mem1 = mem0
    pj0 = t0
    pj1 = t1
    if SPARSE:
        t0 = tl.where(sel_sparse, z0, t0)
        t1 = tl.where(sel_sparse, z1, t1)
        mem1, pj1, p = _inside(z1, c1, sp_ids, sp_lp, p, start + SUB)
        mem0, pj0, p = _inside(z0, c0, sp_ids, sp_lp, p, start)
    g0 = _grad_block(z0, t0, c0, y, zs, l2_st, l2_s1, ts, l2_tt, c_t, c_ce, k2, HAS_CE, HAS_KL,
                     mem0, pj0, SPARSE)
    g1 = _grad_block(z1, t1, c1, y, zs, l2_st, l2_s1, ts, l2_tt, c_t, c_ce, k2, HAS_CE, HAS_KL,
                     mem1, pj1, SPARSE)
    g0 = tl.where(active, g0, 0.0).to(g_row.dtype.element_ty)
    g1 = tl.where(active, g1, 0.0).to(g_row.dtype.element_ty)
    if TAIL:
        tl.store(g_row + c0, g0, mask=c0 < s_lim)
        tl.store(g_row + c1, g1, mask=c1 < s_lim)
    else:
        tl.store(_at(g_row, c0, ALIGNED), g0)
        tl.store(_at(g_row, c1, ALIGNED), g1)
    return p


@triton.jit
def _grad_row(z_row, o_row, w_row, g_row, V, active, use_old, use_new, y, zs, l2_st, l2_s1, ts,
              l2_tt, c_t, c_ce, k2, SUB: tl.constexpr, HAS_NEW: tl.constexpr,
              HAS_CE: tl.constexpr, HAS_KL: tl.constexpr, PEEL: tl.constexpr, sel_sparse=False,
              sp_ids=None, sp_lp=None, sp_k=0, SPARSE: tl.constexpr = False):
    """The gradient pass over one row, from its last columns to its first (the blocks the
    statistics pass read last are the likeliest still in L2): the masked tail, then whole
    iterations of two [SUB] blocks, all loads at the top, then (PEEL) the masked head before the
    student row's first 16-byte boundary (`_stream_row`). Reads the student (not for an ignored
    row) and the selected teacher (use_old: old, use_new: new, neither: none); writes every
    column (zeros when not active). Each block is read before it is written, so g may be the
    student. SPARSE: a row whose selected teacher is sparse (sel_sparse) reads no teacher row;
    its ids sp_ids (sp_k of them) and log-probabilities sp_lp are walked from the last."""
    lanes = tl.arange(0, SUB)  # [SUB]
    # V or 0 per row: as divisible as V, so the tail's masks stay uniform over a vector of columns
    z_lim = tl.where(active, V, 0)
    dense_t = (use_old | use_new) & (sel_sparse == 0)
    t_lim = tl.where(active & dense_t, V, 0)
    o_lim = tl.where(active & use_old & dense_t, V, 0)
    w_lim = tl.where(active & use_new & dense_t, V, 0)
    p = tl.where(sel_sparse & active, sp_k - 1, -1)  # -1: no ids to walk
    h = 0
    if PEEL:
        h = tl.minimum(_peel(z_row), V)
    n_main = (V - h) // (2 * SUB)
    start = h + n_main * (2 * SUB)
    p = _grad_pair(z_row, o_row, w_row, g_row, start + lanes, V, z_lim, t_lim, o_lim,
                   w_lim, active, use_new, y, zs, l2_st, l2_s1, ts, l2_tt, c_t, c_ce, k2, SUB,
                   HAS_NEW, HAS_CE, HAS_KL, True, False, start, sel_sparse, sp_ids, sp_lp, p,
                   SPARSE)
    for j in range(n_main):
        start = h + (n_main - 1 - j) * (2 * SUB)
        p = _grad_pair(z_row, o_row, w_row, g_row, start + lanes, V,
                       z_lim, t_lim, o_lim, w_lim, active, use_new, y, zs, l2_st, l2_s1, ts,
                       l2_tt, c_t, c_ce, k2, SUB, HAS_NEW, HAS_CE, HAS_KL, False, PEEL, start,
                       sel_sparse, sp_ids, sp_lp, p, SPARSE)
    if PEEL:  # columns [0, h)
        _grad_pair(z_row, o_row, w_row, g_row, lanes, h, tl.minimum(z_lim, h),
                   tl.minimum(t_lim, h), tl.minimum(o_lim, h), tl.minimum(w_lim, h), active,
                   use_new, y, zs, l2_st, l2_s1, ts, l2_tt, c_t, c_ce, k2, SUB, HAS_NEW, HAS_CE,
                   HAS_KL, True, False, 0, sel_sparse, sp_ids, sp_lp, p, SPARSE)


# Below this, a tail sum taken relative to the student's maximum may have lost terms to exp2's
# flush to 0 (each below 2^-126, at most V of them): such rows redo it against the tail's own max.
TAIL_TINY = tl.constexpr(2.0 ** -60)


@triton.jit
def _tail_stream(z_row, ids, n_ids, v_lim, c_t, SUB: tl.constexpr):
    """(max, sum exp2((z - max) c_t)) over the student's columns outside a sparse teacher's ids,
    in one more pass over the row: the exact tail of rows whose tail is tiny next to the
    student's maximum (rare: the statistics pass takes it from the student's own exp)."""
    lanes = tl.arange(0, SUB)
    m = tl.full([SUB], NEG_INF, tl.float32)
    arg = tl.zeros([SUB], tl.int32)
    s = tl.zeros([SUB], tl.float32)
    p = 0
    for c0 in range(0, v_lim, SUB):
        cols = c0 + lanes
        z = tl.load(z_row + cols, mask=cols < v_lim, other=NEG_INF).to(tl.float32)
        x, p = _outside(z, cols, ids, n_ids, p, c0 + SUB)
        m, arg, s, _, _ = _lane_teacher(x, x, x, cols, m, arg, s, s, s, c_t, False, False)
    best, _, ref = _lanes_max(m, arg, m, arg, False)
    return best, _lanes_sum(s, m, s, m, ref, c_t, False)


@triton.jit
def _sparse_kl_part(z_row, ids, lp, j, lim, zs, log_st, inv_t):
    """sum p_j (lp_j - log q_j) over the ids j < lim of one [KB] chunk j."""
    jm = j < lim
    at = tl.load(ids + j, mask=jm, other=0)
    lpj = tl.load(lp + j, mask=jm, other=NEG_INF)
    zj = tl.load(z_row + at, mask=jm, other=0.0).to(tl.float32)
    p = tl.exp(lpj)
    # p == 0 terms are 0, also against a -inf student logit
    return tl.sum(tl.where(p > 0.0, p * (lpj - ((zj - zs) * inv_t - log_st)), 0.0), 0)


@triton.jit
def _sparse_kl(z_row, ids, lp, n_ids, tail, active, zs, log_st, inv_t, tref, s_tail,
               KB: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """A sparse teacher's KL over its k + 1 categories, from z[ids] (read KB at a time) and the
    student's tail stream (tref = its max, 0 for none; s_tail its sum); also log S_tt, the
    gradient's normaliser of the tail target, log S_tail - TAIL (inf where there is no tail)."""
    lim = tl.where(active, n_ids, 0)
    if ONE_CHUNK:  # k <= KB: no loop (and no reduction inside one)
        acc = _sparse_kl_part(z_row, ids, lp, tl.arange(0, KB), lim, zs, log_st, inv_t)
    else:
        acc = 0.0
        for j0 in range(0, n_ids, KB):
            acc += _sparse_kl_part(z_row, ids, lp, j0 + tl.arange(0, KB), lim, zs, log_st, inv_t)
    p_tail = tl.exp(tail)
    log_qt = (tref - zs) * inv_t + tl.log(s_tail) - log_st  # never 1 - sum_K q
    has_tail = (p_tail > 0.0) & (s_tail > 0.0)
    t_term = tl.where(has_tail, p_tail * (tail - log_qt), 0.0)
    t_term = tl.where((p_tail > 0.0) & (s_tail == 0.0), float("inf"), t_term)
    return acc + t_term, tl.where(has_tail, tl.log(s_tail) - tail, float("inf"))


@triton.jit
def _compat_loss_kernel(
    z_ptr, z_sb, z_st,
    o_ptr, o_sb, o_st,
    w_ptr, w_sb, w_st,
    g_ptr, g_sb, g_st,
    y_ptr, m_ptr, scale_ptr, out_ptr,
    oi_ptr, ol_ptr, or_ptr, O_K, wi_ptr, wl_ptr, wr_ptr, W_K,
    T_LEN, V, inv_t, kl_weight, ce_weight, ignore_index,
    HAS_NEW: tl.constexpr, MASK_MODE: tl.constexpr, OLD_AT_ONE: tl.constexpr,
    HAS_GRAD: tl.constexpr, HAS_KL: tl.constexpr, HAS_CE: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr, PEEL: tl.constexpr,
    OLD_SPARSE: tl.constexpr = False, NEW_SPARSE: tl.constexpr = False, KB: tl.constexpr = 16,
    ONE_CHUNK: tl.constexpr = True,
):
    """One token row: statistics pass, mask, loss, the row stats, then (HAS_GRAD) the gradient.

    Bytes per valid row (e = element size): pass 1 reads V * (e_z + e_o [+ e_w]) once. With
    SINGLE_BLOCK the row stays in registers and the gradient adds only V * e_g written; otherwise
    pass 2 reads the student and the ONE teacher the mask selected again and writes the gradient:
    + V * (e_z + e_t + e_g). An ignored row reads nothing and writes V * e_g zeros (with a grad).
    BLOCK_V: the row's one block (SINGLE_BLOCK), else the columns of one loop iteration.

    OLD_SPARSE / NEW_SPARSE (loop path only): that teacher is given sparsely, O_K ids oi_ptr,
    log-probabilities ol_ptr and row scalars or_ptr per row (README.md, "Sparse teachers"): no
    row of it is read, its tail stream is the student's outside the ids, z[ids] is read in
    chunks of KB after pass 1. With one sparse teacher selected, pass 2 reads the student only.
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
    SUB: tl.constexpr = BLOCK_V if SINGLE_BLOCK else BLOCK_V // 2
    v_lim = tl.where(active, V, 0)  # an ignored row reads nothing
    oi_row = oi_ptr + row * O_K
    ol_row = ol_ptr + row * O_K
    wi_row = wi_ptr + row * W_K
    wl_row = wl_ptr + row * W_K
    (zb, z_arg, s_st, s_s1, ob, o_arg, s_o, a_o, s_o1, wb, w_arg, s_w, a_w, z, o, w, zr, orr,
     wr) = _stream_row(z_row, o_row, w_row, v_lim, V, inv_t, SUB, HAS_NEW, OLD_AT_ONE,
                       SINGLE_BLOCK, PEEL, oi_row, O_K, wi_row, W_K, OLD_SPARSE, NEW_SPARSE)
    # the label's logits: one in-range element each (never an address from an unchecked label)
    y_at = tl.where(y_ok, y, 0)
    z_y = tl.load(z_row + y_at, mask=active & y_ok, other=0.0).to(tl.float32)
    o_y = 0.0
    if OLD_AT_ONE and not OLD_SPARSE:
        o_y = tl.load(o_row + y_at, mask=active & y_ok, other=0.0).to(tl.float32)

    nan = float("nan")
    z_y = tl.where(y_ok, z_y, nan)
    zs = tl.where(zb == NEG_INF, 0.0, zb)
    os_ = tl.where(ob == NEG_INF, 0.0, ob)
    ws = tl.where(wb == NEG_INF, 0.0, wb)
    log_st = tl.log(s_st)
    log_s1 = tl.log(s_s1)
    log_so = tl.log(s_o)
    # KL = E_pt[(x - xref) - (z - zref)]/T - log S_t + log S_s: differences to the maxima only
    kl_old = (a_o / s_o) * inv_t - log_so + log_st
    ce = (zs - z_y) + log_s1
    old_lp = (o_y - os_) - tl.log(s_o1)
    if OLD_SPARSE:  # s_o: its tail sum relative to ob = the student's max (os_ its reference)
        tail_o = tl.load(or_ptr + row * 3 + SC_TAIL)
        if active & (tail_o > NEG_INF) & (s_o < TAIL_TINY):
            ob, s_o = _tail_stream(z_row, oi_row, O_K, v_lim, inv_t * LOG2E, SUB)
            os_ = tl.where(ob == NEG_INF, 0.0, ob)
        kl_old, log_so = _sparse_kl(z_row, oi_row, ol_row, O_K, tail_o, active, zs, log_st,
                                    inv_t, os_, s_o, KB, ONE_CHUNK)
        o_arg = tl.load(or_ptr + row * 3 + SC_ARGMAX).to(tl.int32)
        old_lp = tl.load(or_ptr + row * 3 + SC_LABEL_LP)
    kl_new = 0.0
    log_sw = 0.0
    if HAS_NEW:
        log_sw = tl.log(s_w)
        kl_new = (a_w / s_w) * inv_t - log_sw + log_st
        if NEW_SPARSE:
            tail_w = tl.load(wr_ptr + row * 3 + SC_TAIL)
            if active & (tail_w > NEG_INF) & (s_w < TAIL_TINY):
                wb, s_w = _tail_stream(z_row, wi_row, W_K, v_lim, inv_t * LOG2E, SUB)
                ws = tl.where(wb == NEG_INF, 0.0, wb)
            kl_new, log_sw = _sparse_kl(z_row, wi_row, wl_row, W_K, tail_w, active, zs, log_st,
                                        inv_t, ws, s_w, KB, ONE_CHUNK)
            w_arg = tl.load(wr_ptr + row * 3 + SC_ARGMAX).to(tl.int32)

    if MASK_MODE == M_GIVEN:
        to_old = tl.load(m_ptr + row) != 0
    elif MASK_MODE == M_MUSCLE:
        to_old = z_arg != y
    elif MASK_MODE == M_OLD_CORRECT:
        to_old = o_arg == y
    elif MASK_MODE == M_TOKEN_LIKELIHOOD:
        to_old = (z_y - zs - log_s1) < old_lp
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
        tl.store(out + S_OLD_LOGP, tl.where(active, old_lp, 0.0))
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
        k2 = inv_t * LOG2E
        l2_st = log_st * LOG2E
        l2_s1 = log_s1 * LOG2E
        l2_tt = log_tt * LOG2E
        g_row = g_ptr + b * g_sb + t * g_st
        if SINGLE_BLOCK:
            g_ty = g_ptr.dtype.element_ty
            if PEEL:  # the aligned middle (vector stores), then the head and tail
                h, n_vec, cols, rcols = _one_block_cols(z_row, V, SUB)
                g = _one_block_grad(z, o, w, cols, use_old, use_new, active, y, zs, l2_st,
                                    l2_s1, ts, l2_tt, c_t, c_ce, k2, HAS_NEW, HAS_CE, HAS_KL)
                tl.store(_at(g_row, cols, True), g.to(g_ty), mask=tl.arange(0, SUB) < n_vec)
                gr = _one_block_grad(zr, orr, wr, rcols, use_old, use_new, active, y, zs, l2_st,
                                     l2_s1, ts, l2_tt, c_t, c_ce, k2, HAS_NEW, HAS_CE, HAS_KL)
                tl.store(g_row + rcols, gr.to(g_ty), mask=rcols < V)
            else:
                cols = tl.arange(0, SUB)
                g = _one_block_grad(z, o, w, cols, use_old, use_new, active, y, zs, l2_st,
                                    l2_s1, ts, l2_tt, c_t, c_ce, k2, HAS_NEW, HAS_CE, HAS_KL)
                tl.store(g_row + cols, g.to(g_ty), mask=cols < V)
        else:
            # only the selected teacher's row is read again (none when it is sparse)
            SPARSE: tl.constexpr = OLD_SPARSE or NEW_SPARSE
            if OLD_SPARSE and NEW_SPARSE:
                sel_sparse = use_old | use_new
                sp_ids = tl.where(use_new, wi_row, oi_row)
                sp_lp = tl.where(use_new, wl_row, ol_row)
                sp_k = tl.where(use_new, W_K, O_K)
            elif OLD_SPARSE:
                sel_sparse = use_old
                sp_ids, sp_lp, sp_k = oi_row, ol_row, O_K
            else:  # NEW_SPARSE, or none (then no row selects a sparse teacher)
                sel_sparse = use_new
                if not NEW_SPARSE:
                    sel_sparse = use_new != use_new
                sp_ids, sp_lp, sp_k = wi_row, wl_row, W_K
            _grad_row(z_row, o_row, w_row, g_row, V, active, use_old, use_new, y, zs, l2_st,
                      l2_s1, ts, l2_tt, c_t, c_ce, k2, BLOCK_V, HAS_NEW, HAS_CE, HAS_KL, PEEL,
                      sel_sparse, sp_ids, sp_lp, sp_k, SPARSE)


@triton.jit
def _compat_partials_kernel(
    z_ptr, z_sb, z_st,
    o_ptr, o_sb, o_st,
    w_ptr, w_sb, w_st,
    y_ptr, out_ptr,
    T_LEN, V, inv_t, ignore_index,
    HAS_NEW: tl.constexpr, OLD_AT_ONE: tl.constexpr, BLOCK_V: tl.constexpr, PEEL: tl.constexpr,
):
    """One token row of one vocabulary slice: the 15 partial statistics (README.md, vocabulary
    parallel), the statistics pass of ``_compat_loss_kernel`` without the finalisation.

    Reads V * (e_z + e_o [+ e_w]) per valid row once, BLOCK_V columns a loop iteration (the same
    streaming helper as the row kernel's loop path); an ignored row reads nothing and writes 15
    zeros. A label outside [0, V) is another rank's: its label columns are 0.
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
    (zb, z_arg, s_st, s_s1, ob, o_arg, s_o, a_o, s_o1, wb, w_arg, s_w, a_w, _, _, _, _, _,
     _) = _stream_row(z_row, o_row, w_row, v_lim, V, inv_t, BLOCK_V // 2, HAS_NEW, OLD_AT_ONE,
                      False, PEEL)
    y_at = tl.where(own, y, 0)
    z_y = tl.load(z_row + y_at, mask=active & own, other=0.0).to(tl.float32)
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
        o_y = tl.load(o_row + y_at, mask=active & own, other=0.0).to(tl.float32)
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
    BLOCK_V: tl.constexpr, PEEL: tl.constexpr,
):
    """One token row of one vocabulary slice: its gradient from the 8 row constants.

    consts: zref, S_t, S_1, tref, S_tt, c_kl, c_ce, sel (-1 ignored, 0 no teacher, 1 old, 2 new).
    Reads V * (e_z [+ e_t]) and writes V * e_g per valid row, BLOCK_V columns a block (each
    block read before it is written, so ``g`` may be the student); an ignored row reads nothing
    and writes V * e_g zeros.
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
    if not HAS_NEW:
        use_new = sel != sel  # no new teacher: sel 2 selects nothing
    has_t = use_old | use_new
    # without a teacher term the teacher reads as -inf and p_t = exp(-inf - 0) = 0 exactly,
    # whatever the caller left in tref and S_tt
    ts = tl.where(has_t, tl.load(c + C_TREF), 0.0)
    log_tt = tl.where(has_t, tl.log(tl.load(c + C_S_TT)), 0.0)
    _grad_row(z_row, o_row, w_row, g_row, V, active, use_old, use_new, y, zs, log_st * LOG2E,
              log_s1 * LOG2E, ts, log_tt * LOG2E, c_kl, c_ce, inv_t * LOG2E, BLOCK_V, HAS_NEW,
              HAS_CE, HAS_KL, PEEL)


@triton.jit
def _scale_block(g_row, cols, go, lim, TAIL: tl.constexpr, ALIGNED: tl.constexpr):
    if TAIL:
        cm = cols < lim
        g = tl.load(g_row + cols, mask=cm).to(tl.float32)
        tl.store(g_row + cols, (g * go).to(g_row.dtype.element_ty), mask=cm)
    else:
        g = tl.load(_at(g_row, cols, ALIGNED)).to(tl.float32)
        tl.store(_at(g_row, cols, ALIGNED), (g * go).to(g_row.dtype.element_ty))


@triton.jit
def _scale_rows_kernel(g_ptr, g_sb, g_st, go_ptr, T_LEN, V, PER_ROW: tl.constexpr,
                       BLOCK_V: tl.constexpr, PEEL: tl.constexpr):
    """g[row] *= go (per row or one value): the masked head (PEEL, as `_stream_row`), an aligned
    main loop without masks, the masked tail. Reads and writes V * e_g per row."""
    row = tl.program_id(0).to(tl.int64)
    if PER_ROW:
        go = tl.load(go_ptr + row)
    else:
        go = tl.load(go_ptr)
    # an upstream gradient of exactly 1 (the usual loss.backward()) costs no pass over the row
    v_end = tl.where(go == 1.0, 0, V)
    g_row = g_ptr + (row // T_LEN) * g_sb + (row % T_LEN) * g_st
    lanes = tl.arange(0, BLOCK_V)
    h = 0
    if PEEL:
        h = tl.minimum(_peel(g_row), v_end)
        _scale_block(g_row, lanes, go, h, True, False)
    n_main = (v_end - h) // BLOCK_V
    for i in range(n_main):
        _scale_block(g_row, h + i * BLOCK_V + lanes, go, v_end, False, PEEL)
    _scale_block(g_row, h + n_main * BLOCK_V + lanes, go, v_end, True, False)


def _on_device_of(t: torch.Tensor):
    """Launch on ``t``'s GPU, whichever device is current (Triton launches on the current one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def needs_peel(*rows: torch.Tensor) -> bool:
    """Whether the streaming kernels take their head peel (PEEL) over these [B, T, V] tensors
    (the student first; unit stride on V).

    False when Triton's binder already knows every row starts on 16 bytes (every data pointer a
    multiple of 16 and every row stride of 16 elements: its divisibility specialisation), and
    False when no single peel aligns them all: the kernel peels h = the student row's columns
    before its first 16-byte boundary, and a main-loop block is claimed aligned in every row, so
    every row read or written must be 16-byte aligned at column h too. The row start's offset
    modulo 16 bytes repeats with period 16 in b and t, so 16 x 16 rows decide it for all rows.
    """
    if all(r.data_ptr() % 16 == 0 and r.stride(0) % 16 == 0 and r.stride(1) % 16 == 0
           for r in rows):
        return False
    z = rows[0]
    B, T = z.shape[0], z.shape[1]
    for b in range(min(B, 16)):
        for t in range(min(T, 16)):
            start = z.data_ptr() + (b * z.stride(0) + t * z.stride(1)) * z.element_size()
            head_bytes = -start % 16
            if head_bytes % z.element_size():
                return False
            h = head_bytes // z.element_size()
            for r in rows[1:]:
                col_h = r.data_ptr() + (b * r.stride(0) + t * r.stride(1) + h) * r.element_size()
                if col_h % 16:
                    return False
    return True


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


def design_bytes_sparse(n_rows: int, vocab: int, elem: int, *, k: int, teachers: int,
                        grad: bool) -> int:
    """DRAM bytes of ``_compat_loss_kernel`` with ``teachers`` sparse teachers of ``k`` ids:
    statistics pass, the student once, each teacher's ids, log-probabilities (8 k) and row
    scalars (12), ``N_STATS`` float32 written; with a gradient (of a row whose selected teacher
    is sparse) the student again, its ids and log-probabilities again, the gradient written.
    About ``3 V e_z + O(k)`` a row, against ``V (2 e_z + e_o + e_w + e_t + e_g)`` dense."""
    stats = n_rows * (vocab * elem + teachers * (8 * k + 12) + N_STATS * 4)
    if not grad:
        return stats
    return stats + n_rows * (vocab * 2 * elem + 8 * k)


def loop_columns(kernel: str, block_v: int, single_block: bool = False) -> list:
    """Columns one iteration of each loop of ``kernel`` covers, in code order: the statistics
    loop (two blocks of BLOCK_V / 2), then the gradient loop (two blocks of BLOCK_V)."""
    return {"_compat_loss_kernel": [] if single_block else [block_v, 2 * block_v],
            "_compat_partials_kernel": [block_v],
            "_compat_grad_rows_kernel": [2 * block_v],
            "_scale_rows_kernel": [block_v]}[kernel]


def _blocks(vocab: int):
    """(single block, BLOCK_V) of the row kernel: the whole row when it fits, else one loop
    iteration of LOOP_BLOCK_V columns (two blocks of LOOP_BLOCK_V / 2)."""
    block = triton.next_power_of_2(vocab)
    if block <= MAX_FUSED_BLOCK_V:
        return True, block
    return False, LOOP_BLOCK_V


def _loop_block(vocab: int) -> int:
    """Columns per loop iteration of the streaming kernels (partials, gradient rows, scaling)."""
    return min(triton.next_power_of_2(vocab), LOOP_BLOCK_V)


def _warps(block: int, single: bool) -> int:
    """A one-block row: up to 16 warps (16 columns a thread at 8192). A loop iteration: up to 8
    warps, 4 columns a thread in each of its two blocks: the per-lane state then fits in the
    registers of two CTAs an SM (benchmarks/NOTES.md, the compiled-code model)."""
    return max(1, min(16 if single else 8, block // 256))


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
    old_sparse: Optional[SparseRows] = None,
    new_sparse: Optional[SparseRows] = None,
) -> torch.Tensor:
    """Launch ``_compat_loss_kernel`` over the rows of [B, T, V] inputs; returns [B*T, 9] row stats.

    A teacher given sparsely (``old_sparse`` / ``new_sparse``, README.md "Sparse teachers") has
    None logits; such a launch takes the loop path whatever V (the one-block path keeps teacher
    rows in registers, which a sparse teacher does not have) and moves per valid row
    ``V * e_z + 8 k + 12`` bytes for the statistics, ``+ V * (e_z + e_g) + 8 k`` for a gradient
    whose selected teacher is sparse.

    Bytes moved per valid row: ``V * (e_z + e_o + e_w)`` read once; with a gradient, rows of at
    most ``MAX_FUSED_BLOCK_V`` columns add only ``V * e_g`` written, longer rows add
    ``V * (e_z + e_t + e_g)`` (student and the one selected teacher read again, gradient written).
    An ignored row costs its gradient write of zeros only. Plus N_STATS float32 (36 bytes) of row
    stats per row (`design_bytes` counts all of this).
    """
    B, T, V = logits.shape
    n = B * T
    out = torch.empty((n, N_STATS), dtype=torch.float32, device=logits.device)
    if n == 0:
        return out
    single, block = _blocks(V)
    if old_sparse is not None or new_sparse is not None:
        single, block = False, LOOP_BLOCK_V
    # a sparse (or absent) teacher's row is never read: the student stands in for its pointer
    o = old_logits if old_logits is not None else logits
    w = new_logits if new_logits is not None else o
    has_new = new_logits is not None or new_sparse is not None
    g = grad if grad is not None else logits
    peel = needs_peel(logits, o, w, g)
    none_i = torch.zeros(1, dtype=torch.int32, device=logits.device)
    none_f = torch.zeros(1, dtype=torch.float32, device=logits.device)
    so = old_sparse or SparseRows(none_i, none_f, none_f)
    sw = new_sparse or SparseRows(none_i, none_f, none_f)
    k_o = so.idx.shape[-1] if old_sparse is not None else 0
    k_w = sw.idx.shape[-1] if new_sparse is not None else 0
    # z[ids] in one [KB] chunk up to 4096 ids, else a loop of 1024
    kb = triton.next_power_of_2(max(k_o, k_w, 1))
    kb = kb if kb <= 4096 else 1024
    with _on_device_of(logits):
        _compat_loss_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1),
            o, o.stride(0), o.stride(1),
            w, w.stride(0), w.stride(1),
            g, g.stride(0), g.stride(1),
            labels, mask if mask is not None else labels, scale, out,
            so.idx, so.lp, so.row, k_o, sw.idx, sw.lp, sw.row, k_w,
            T, V, float(inv_temperature), float(kl_weight), float(ce_weight), int(ignore_index),
            HAS_NEW=has_new, MASK_MODE=int(mask_mode),
            OLD_AT_ONE=bool(old_label_logprob or mask_mode == MaskMode.TOKEN_LIKELIHOOD),
            HAS_GRAD=grad is not None, HAS_KL=kl_weight != 0, HAS_CE=ce_weight != 0,
            SINGLE_BLOCK=single, BLOCK_V=block, PEEL=peel, num_warps=_warps(block, single),
            OLD_SPARSE=old_sparse is not None, NEW_SPARSE=new_sparse is not None, KB=kb,
            ONE_CHUNK=max(k_o, k_w) <= kb,
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
    block = max(2, _loop_block(V))  # two blocks of BLOCK_V // 2 a loop iteration: V = 1 too
    w = new_logits if new_logits is not None else old_logits
    with _on_device_of(logits):
        _compat_partials_kernel[(n,)](
            logits, logits.stride(0), logits.stride(1),
            old_logits, old_logits.stride(0), old_logits.stride(1),
            w, w.stride(0), w.stride(1),
            labels, out,
            T, V, float(inv_temperature), int(ignore_index),
            HAS_NEW=new_logits is not None, OLD_AT_ONE=bool(old_at_one),
            BLOCK_V=block, PEEL=needs_peel(logits, old_logits, w), num_warps=_warps(block, False),
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
    block = _loop_block(V)
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
            BLOCK_V=block, PEEL=needs_peel(logits, old_logits, w, grad),
            num_warps=_warps(block, False),
        )


def scale_rows_triton(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad[b, t, :] *= grad_output (0-dim, or [B*T] per row), skipping rows where it equals 1."""
    B, T, V = grad.shape
    if B * T == 0:
        return
    block = _loop_block(V)
    go = grad_output.reshape(-1).to(torch.float32).contiguous()
    with _on_device_of(grad):
        _scale_rows_kernel[(B * T,)](
            grad, grad.stride(0), grad.stride(1), go, T, V,
            PER_ROW=grad_output.dim() > 0, BLOCK_V=block, PEEL=needs_peel(grad),
            num_warps=_warps(block, False),
        )
