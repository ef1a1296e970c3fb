"""Matrix-vector and GEMM kernels over low-precision weights: bfloat16 bits (uint16) and int8 blocks.

Decode streams every weight once per token, so these kernels must turn the halved (bf16) or quartered
(int8) bytes into time saved, which only happens when the widening to float32 is vectorized:

- bf16: two weights are read as one uint32; the even one is `bits << 16`, the odd one `bits & 0xFFFF0000`,
  each bit-cast to float32. Shifts, masks and FMAs on whole vectors (no per-element zero-extension); the
  activation row is split once per call into its even and odd elements to match.
- int8 (`passes.weights`, Q8_0 layout): q[N, K/32, 32] int8 and scales s[N, K/32, 1] float32, a weight
  being q * s. The kernel sums x * q over each block of 32 and scales the block's sum once. Indexing the
  block and the lane as separate (non-negative) axes keeps LLVM's loads contiguous; a flat `k = 32b + i`
  index made it emit gathers, 10x slower.

Rows of the weight matrix are split across threads four at a time, as `blas.matvec` does (the activation
loads are shared by the four rows). Large row counts (prefill) widen a block of weight rows to a float32
tile and call the GEMM.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from backends.numba_cpu.blas import _bits_as_f32, bf16, gemm

_FASTMATH = {"reassoc", "contract"}  # vectorized sums; NaN and inf keep their meaning
_HI = np.uint32(0xFFFF0000)
_SHIFT = np.uint32(16)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec_bf16(a, w, c):
    """c[M, N] = a[M, K] @ w[N, K]^T with bfloat16 weights (uint16 bits), for a few rows M (decode)."""
    m_rows, k_dim = a.shape
    n_dim = w.shape[0]
    if k_dim % 2 or not w.flags.c_contiguous:
        return _matvec_bf16_plain(a, w, c)
    pairs = w.view(np.uint32)  # [N, K/2]: low half the even element, high half the odd one
    half = k_dim // 2
    even = np.empty((m_rows, half), np.float32)
    odd = np.empty((m_rows, half), np.float32)
    for m in range(m_rows):
        for j in range(half):
            even[m, j] = a[m, 2 * j]
            odd[m, j] = a[m, 2 * j + 1]
    for blk in prange((n_dim + 3) // 4):
        n0 = blk * 4
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


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec_int8(a, q, s, c):
    """c[M, N] = a[M, K] @ (q * s)^T for a few rows M, with int8 weights q[N, K/32, 32] and float32 block
    scales s[N, K/32, 1] (see the module docstring)."""
    m_rows = a.shape[0]
    n_dim, blocks, width = q.shape
    x = a.reshape((m_rows, blocks, width)) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(
        (m_rows, blocks, width))
    for blk in prange((n_dim + 3) // 4):
        n0 = blk * 4
        if n0 + 4 <= n_dim:
            for m in range(m_rows):
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for b in range(blocks):
                    t0 = np.float32(0.0)
                    t1 = np.float32(0.0)
                    t2 = np.float32(0.0)
                    t3 = np.float32(0.0)
                    for i in range(width):
                        xi = x[m, b, i]
                        t0 += xi * np.float32(q[n0, b, i])
                        t1 += xi * np.float32(q[n0 + 1, b, i])
                        t2 += xi * np.float32(q[n0 + 2, b, i])
                        t3 += xi * np.float32(q[n0 + 3, b, i])
                    s0 += t0 * s[n0, b, 0]
                    s1 += t1 * s[n0 + 1, b, 0]
                    s2 += t2 * s[n0 + 2, b, 0]
                    s3 += t3 * s[n0 + 3, b, 0]
                c[m, n0] = s0
                c[m, n0 + 1] = s1
                c[m, n0 + 2] = s2
                c[m, n0 + 3] = s3
        else:
            for n in range(n0, n_dim):
                for m in range(m_rows):
                    acc = np.float32(0.0)
                    for b in range(blocks):
                        t = np.float32(0.0)
                        for i in range(width):
                            t += x[m, b, i] * np.float32(q[n, b, i])
                        acc += t * s[n, b, 0]
                    c[m, n] = acc


@njit(parallel=True, cache=True)
def _dequantize_rows(q, s, n0, n1, out):
    """out[n - n0, 32b + i] = q[n, b, i] * s[n, b] for rows n0..n1: what the reference backend computes."""
    blocks, width = q.shape[1], q.shape[2]
    for n in prange(n1 - n0):
        for b in range(blocks):
            scale = s[n0 + n, b, 0]
            for i in range(width):
                out[n, b * width + i] = np.float32(q[n0 + n, b, i]) * scale


@njit(cache=True)
def gemm_int8(a, q, s, c):
    """c = a @ (q * s)^T for many rows (prefill): dequantize a block of weight rows to a float32 tile,
    then one GEMM each; the tile stays in cache between the two."""
    n_dim, blocks, width = q.shape
    block = 256
    tile = np.empty((min(block, n_dim), blocks * width), np.float32)
    for n0 in range(0, n_dim, block):
        n1 = min(n_dim, n0 + block)
        _dequantize_rows(q, s, n0, n1, tile)
        gemm(a, tile[: n1 - n0], c[:, n0:n1], True)
