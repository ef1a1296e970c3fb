"""Matrix-vector and GEMM kernels over low-precision weights: bfloat16 bits (uint16) and int8 blocks.

Decode streams every weight once per token, so these kernels must turn the halved (bf16) or quartered
(int8) bytes into time saved, which only happens when the widening to float32 is vectorized:

- bf16: two weights are read as one uint32; the even one is `bits << 16`, the odd one `bits & 0xFFFF0000`,
  each bit-cast to float32. Shifts, masks and FMAs on whole vectors (no per-element zero-extension); the
  activation row is split once per call into its even and odd elements to match.
- int8: integer dot products against activations quantized the same way, in `int8.py` (re-exported
  here: generated code imports every low-precision kernel from this module).

The bf16 loops ask LLVM for 512-bit vectors (`blas.wide_vectors`): widening is shuffle-bound, and a
512-bit shuffle widens twice the weights of a 256-bit one (measured at stories110M's shapes, one thread:
1.2-1.4x faster than with LLVM's default 256-bit vectors).

Rows of the weight matrix are split across threads four at a time, as `blas.matvec` does (the activation
loads are shared by the four rows); `matvec2_*` and `matvec3_*` run the rows of two or three matrices that
read the same activations in one parallel loop. Large row counts (prefill) widen a block of weight rows to
a float32 tile and call the GEMM.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from fusec.backends.numba_cpu.blas import _bits_as_f32, bf16, gemm, row_groups, wide_vectors
from fusec.backends.numba_cpu.int8 import gemm_int8, matvec2_int8, matvec3_int8, matvec_int8  # noqa: F401

_FASTMATH = {"reassoc", "contract"}  # vectorized sums; NaN and inf keep their meaning
_HI = np.uint32(0xFFFF0000)
_SHIFT = np.uint32(16)


@njit(inline="always")
def _rows_bf16(even, odd, w, c, n0):
    """c[:, n0:n0+4] = a @ w[n0:n0+4]^T for bf16 bits w[N, K] (C-contiguous, K even) and the activations
    split into their even and odd elements."""
    m_rows, half = even.shape
    pairs = w.view(np.uint32)  # [N, K/2]: low half the even element, high half the odd one
    n_dim = pairs.shape[0]
    if n0 + 4 <= n_dim:
        for m in range(m_rows):
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for j in range(half):
                xe = even[m, j]
                xo = odd[m, j]
                b0 = pairs[n0, j]
                b1 = pairs[n0 + 1, j]
                b2 = pairs[n0 + 2, j]
                b3 = pairs[n0 + 3, j]
                s0 += xe * _bits_as_f32(b0 << _SHIFT) + xo * _bits_as_f32(b0 & _HI)
                s1 += xe * _bits_as_f32(b1 << _SHIFT) + xo * _bits_as_f32(b1 & _HI)
                s2 += xe * _bits_as_f32(b2 << _SHIFT) + xo * _bits_as_f32(b2 & _HI)
                s3 += xe * _bits_as_f32(b3 << _SHIFT) + xo * _bits_as_f32(b3 & _HI)
            c[m, n0] = s0
            c[m, n0 + 1] = s1
            c[m, n0 + 2] = s2
            c[m, n0 + 3] = s3
    else:
        for n in range(n0, n_dim):
            for m in range(m_rows):
                s = np.float32(0.0)
                for j in range(half):
                    b = pairs[n, j]
                    s += even[m, j] * _bits_as_f32(b << _SHIFT) + odd[m, j] * _bits_as_f32(b & _HI)
                c[m, n] = s


@njit(inline="always")
def _split(a):
    """The activation rows a[M, K] split into their even and odd elements, [M, K/2] each."""
    m_rows, half = a.shape[0], a.shape[1] // 2
    even = np.empty((m_rows, half), np.float32)
    odd = np.empty((m_rows, half), np.float32)
    for m in range(m_rows):
        for j in range(half):
            even[m, j] = a[m, 2 * j]
            odd[m, j] = a[m, 2 * j + 1]
    return even, odd


@njit(inline="always")
def _paired(a, w):
    """Whether weight w can be read two bf16 values at a time (else `_matvec_bf16_plain`)."""
    return a.shape[1] % 2 == 0 and w.flags.c_contiguous


# c[M, N] = a[M, K] @ w[N, K]^T with bfloat16 weights (uint16 bits), for a few rows M (decode); `matvec2_bf16`
# and `matvec3_bf16` run two or three matrices that read the same activations in one parallel loop (as
# `blas.matvec2`).
@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec_bf16(a, w, c):
    if not _paired(a, w):
        _matvec_bf16_plain(a, w, c)
        return
    even, odd = _split(a)
    for g in prange(row_groups(w)):
        wide_vectors()
        _rows_bf16(even, odd, w, c, 4 * g)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec2_bf16(a, w0, w1, c0, c1):
    if not (_paired(a, w0) and _paired(a, w1)):
        _matvec_bf16_plain(a, w0, c0)
        _matvec_bf16_plain(a, w1, c1)
        return
    even, odd = _split(a)
    g0 = row_groups(w0)
    for g in prange(g0 + row_groups(w1)):
        wide_vectors()
        if g < g0:
            _rows_bf16(even, odd, w0, c0, 4 * g)
        else:
            _rows_bf16(even, odd, w1, c1, 4 * (g - g0))


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec3_bf16(a, w0, w1, w2, c0, c1, c2):
    if not (_paired(a, w0) and _paired(a, w1) and _paired(a, w2)):
        _matvec_bf16_plain(a, w0, c0)
        _matvec_bf16_plain(a, w1, c1)
        _matvec_bf16_plain(a, w2, c2)
        return
    even, odd = _split(a)
    g0 = row_groups(w0)
    g1 = g0 + row_groups(w1)
    for g in prange(g1 + row_groups(w2)):
        wide_vectors()
        if g < g0:
            _rows_bf16(even, odd, w0, c0, 4 * g)
        elif g < g1:
            _rows_bf16(even, odd, w1, c1, 4 * (g - g0))
        else:
            _rows_bf16(even, odd, w2, c2, 4 * (g - g1))


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
