"""Matrix-vector and GEMM kernels over low-precision weights: bfloat16 bits (uint16) and int8 blocks.

Decode streams every weight once per token, so these kernels must turn the halved (bf16) or quartered
(int8) bytes into time saved, which only happens when the widening to float32 is vectorized:

- bf16: two weights are read as one uint32; the even one is `bits << 16`, the odd one `bits & 0xFFFF0000`,
  each bit-cast to float32. Shifts, masks and FMAs on whole vectors (no per-element zero-extension); every
  32 activations are split into their 16 even and 16 odd lanes once for eight weight rows. Written in LLVM
  IR (`_dot_bf16`), with two accumulators per row (even and odd) reduced once per row: the loop Numba
  vectorized itself split the activations into two new arrays per call and ended every row with a scalar
  remainder; measured side by side (one thread, one activation row), bf16's bytes per second went from
  0.9-1.2x fp32's to 1.5-1.6x at stories110M's shapes, from 0.4-0.5x to 0.6-0.7x at stories15M's (K = 288:
  matrices that small stay in the L2 cache, where fp32 is as fast per weight). Streamed from memory, one
  core read bf16 at 0.6-0.85x fp32's bytes per second: a group's rows are short streams that the hardware
  prefetcher does not ramp up on, so the loop prefetches the next group's rows (`simd.prefetch`); with
  that and eight rows per group, 0.85-1.05x (bench_matvec, one thread).
- int8: integer dot products against activations quantized the same way, in `int8.py` (re-exported
  here: generated code imports every low-precision kernel from this module).

The loops ask LLVM for 512-bit vectors (`blas.wide_vectors`), so that the IR's 16-lane vectors are single
registers on AVX-512 (LLVM otherwise prefers 256-bit ones there; measured at stories15M's K = 288, the two
widths ran alike).

Rows of the weight matrix are split across threads eight at a time (the activation loads are shared by the
eight rows); `matvec2_*` and `matvec3_*` run the rows of two or three matrices that
read the same activations in one parallel loop. Large row counts (prefill) widen a block of weight rows to
a float32 tile and call the GEMM.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fusec.backends.numba_cpu.blas import _bits_as_f32, bf16, gemm, row_groups, wide_vectors
from fusec.backends.numba_cpu.int8 import gemm_int8, matvec2_int8, matvec3_int8, matvec_int8  # noqa: F401
from fusec.backends.numba_cpu.simd import (F32, I8, LANES, V16F, V16I, Arrays, accumulators, at_byte, fma_into, hsum,
                                           intp_args, lanes, prefetch)

_FASTMATH = {"reassoc", "contract"}  # vectorized sums; NaN and inf keep their meaning
_HI = np.uint32(0xFFFF0000)
_SHIFT = np.uint32(16)


def _dot_bf16(count: int):
    """An intrinsic dot(pairs, a, n0, m): the tuple of `count` float32 dot products of activation row m of
    a[M, K] with bf16 weight rows n0.. read as pairs[N, K/2] (uint32: the even element in the low half, the
    odd one in the high half; both C-contiguous, which callers check), over the first K - K % 32 columns
    (`_rows_bf16` adds the rest). Per 16 pairs: one load of 32 activations, split into even and odd lanes
    (shared by the rows); per row one load, a shift and a mask (the widening), two FMAs into the row's even
    and odd accumulators (reduced once at the end), and a prefetch of the same place `count` rows on."""
    @intrinsic
    def dot(typingctx, pairs, a, n0, m):
        if not (isinstance(pairs, types.Array) and pairs.dtype == types.uint32 and pairs.ndim == 2
                and isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2):
            return None

        def codegen(context, builder, signature, args):
            arrays = Arrays(context, builder, signature, args, 2)
            n0v, mv = intp_args(context, builder, signature, args, 2)
            chunks = builder.udiv(arrays.shape(0, 1), ir.Constant(n0v.type, LANES))
            accs = accumulators(builder, 2 * count)
            shift, high = ir.Constant(V16I, [16] * LANES), ir.Constant(V16I, [-(1 << 16)] * LANES)
            ahead = builder.mul(arrays.shape(0, 1), ir.Constant(n0v.type, 4 * count))  # bytes of `count` rows
            with cgutils.for_range(builder, chunks) as loop:
                j = builder.mul(loop.index, ir.Constant(n0v.type, LANES))
                x = arrays.load(1, [mv, builder.add(j, j)], ir.VectorType(F32, 2 * LANES))
                even, odd = lanes(builder, x, 0, LANES, 2), lanes(builder, x, 1, LANES, 2)
                for r in range(count):
                    row = arrays.at(0, [builder.add(n0v, ir.Constant(n0v.type, r)), j])
                    prefetch(builder, at_byte(builder, row, ahead, I8))  # row r of the next group
                    bits = builder.load(builder.bitcast(row, V16I.as_pointer()), align=4)
                    fma_into(builder, accs[2 * r], even, builder.bitcast(builder.shl(bits, shift), V16F))
                    fma_into(builder, accs[2 * r + 1], odd, builder.bitcast(builder.and_(bits, high), V16F))
            sums = [hsum(builder, builder.fadd(builder.load(accs[2 * r]), builder.load(accs[2 * r + 1])))
                    for r in range(count)]
            return context.make_tuple(builder, signature.return_type, sums)
        return types.UniTuple(types.float32, count)(pairs, a, n0, m), codegen
    return dot


ROWS = 8  # weight rows per dot call (the activations' even/odd split is shared by all of them)
_dot8 = _dot_bf16(ROWS)
_dot4 = _dot_bf16(4)
_dot1 = _dot_bf16(1)


@njit(inline="always")
def _pair_dot(a, pairs, m, n, start):
    """The dot product of activation row m with weight row n from pair `start` on (scalar)."""
    s = np.float32(0.0)
    for j in range(start, pairs.shape[1]):
        b = pairs[n, j]
        s += a[m, 2 * j] * _bits_as_f32(b << _SHIFT) + a[m, 2 * j + 1] * _bits_as_f32(b & _HI)
    return s


@njit(inline="always")
def _rows_bf16(a, w, c, n0):
    """c[:, n0:n0+8] = a @ w[n0:n0+8]^T for bf16 bits w[N, K] and activations a[M, K] (both C-contiguous,
    K even); fewer rows at the end of w (four, then one at a time)."""
    pairs = w.view(np.uint32)  # [N, K/2]: low half the even element, high half the odd one
    tail = pairs.shape[1] - pairs.shape[1] % LANES
    rows = min(ROWS, pairs.shape[0] - n0)
    for m in range(a.shape[0]):
        if rows == ROWS:
            d = _dot8(pairs, a, n0, m)
            for r in range(ROWS):
                c[m, n0 + r] = d[r] + _pair_dot(a, pairs, m, n0 + r, tail)
        else:
            done = 0
            if rows >= 4:
                d4 = _dot4(pairs, a, n0, m)
                for r in range(4):
                    c[m, n0 + r] = d4[r] + _pair_dot(a, pairs, m, n0 + r, tail)
                done = 4
            for r in range(done, rows):
                c[m, n0 + r] = _dot1(pairs, a, n0 + r, m)[0] + _pair_dot(a, pairs, m, n0 + r, tail)


@njit(inline="always")
def _paired(a, w):
    """Whether weight w can be read two bf16 values at a time, and w and the activations a a vector at a
    time (else `_matvec_bf16_plain`)."""
    return a.shape[1] % 2 == 0 and w.flags.c_contiguous and a.flags.c_contiguous


# c[M, N] = a[M, K] @ w[N, K]^T with bfloat16 weights (uint16 bits), for a few rows M (decode); `matvec2_bf16`
# and `matvec3_bf16` run two or three matrices that read the same activations in one parallel loop (as
# `blas.matvec2`).
@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec_bf16(a, w, c):
    if not _paired(a, w):
        _matvec_bf16_plain(a, w, c)
        return
    for g in prange(row_groups(w, ROWS)):
        wide_vectors()
        _rows_bf16(a, w, c, ROWS * g)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec2_bf16(a, w0, w1, c0, c1):
    if not (_paired(a, w0) and _paired(a, w1)):
        _matvec_bf16_plain(a, w0, c0)
        _matvec_bf16_plain(a, w1, c1)
        return
    g0 = row_groups(w0, ROWS)
    for g in prange(g0 + row_groups(w1, ROWS)):
        wide_vectors()
        if g < g0:
            _rows_bf16(a, w0, c0, ROWS * g)
        else:
            _rows_bf16(a, w1, c1, ROWS * (g - g0))


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec3_bf16(a, w0, w1, w2, c0, c1, c2):
    if not (_paired(a, w0) and _paired(a, w1) and _paired(a, w2)):
        _matvec_bf16_plain(a, w0, c0)
        _matvec_bf16_plain(a, w1, c1)
        _matvec_bf16_plain(a, w2, c2)
        return
    g0 = row_groups(w0, ROWS)
    g1 = g0 + row_groups(w1, ROWS)
    for g in prange(g1 + row_groups(w2, ROWS)):
        wide_vectors()
        if g < g0:
            _rows_bf16(a, w0, c0, ROWS * g)
        elif g < g1:
            _rows_bf16(a, w1, c1, ROWS * (g - g0))
        else:
            _rows_bf16(a, w2, c2, ROWS * (g - g1))


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _matvec_bf16_plain(a, w, c):
    """`matvec_bf16` one element at a time: for an odd K or a strided weight."""
    m_rows, k_dim = a.shape
    for n in prange(w.shape[0]):
        for m in range(m_rows):
            s = np.float32(0.0)
            for k in range(k_dim):
                s += a[m, k] * bf16(w[n, k])
            c[m, n] = s
