"""int8 matrix-vector and GEMM kernels: int8 weights times int8-quantized activations (Q8_0 x Q8_0).

Weights (`passes.weights`, llama.cpp's Q8_0 layout): q[N, K/32, 32] int8 and scales s[N, K/32, 1] float32,
a weight being q * s. A matrix-vector call first quantizes its activation rows the same way, once for all
the matrices it runs (`quantize_rows`: x[M, K/32, 32] int8 and scales xs[M, K/32]); each block's dot
product is then a sum of integer products, exact in int32, times s * xs, summed in float32. What this
computes is defined by the reference semantics (`fusec.semantics.quantize_activations`): a matmul that
reads an int8 weight (marked `quantize="int8"` by the weights pass) multiplies by its activations
quantized that way. Prefill computes the same: quantized activations times dequantized weights, with MKL
by each thread on its own weight tiles (`gemm_widen.gemm3_int8_mkl`, ...), else in one OpenBLAS GEMM per
block of weight rows (`gemm_int8`).

Why integer products: widening every weight to float32 (sign-extend, convert, scale, FMA) is shuffle- and
port-bound and read int8 weights at half fp32's bytes per second. Here two blocks (64 bytes) of a row cost
one VNNI `vpdpbusd` (or `pmaddwd` and adds on CPUs without VNNI), a conversion and one FMA into 16 float32
lanes, reduced once at the end; the quantization is vectorized too, and the next group of rows is
prefetched while this one is summed (`int8_dot`). Measured side by side (bench_matvec, one thread, weights
streamed from memory): int8 read 0.55-0.8x fp32's bytes per second with int16 activations, one `pmaddwd`
per block and no prefetch; 0.85-0.95x with these (fp32 time over int8 time: 2.0-2.9x before, 2.9-3.4x).
"""
from __future__ import annotations

import numpy as np
from numba import literally, njit, prange

from fusec.backends.numba_cpu.blas import gemm
from fusec.backends.numba_cpu.int8_dot import BLOCK, quantize_block, widen_block
from fusec.backends.numba_cpu.matvec import FASTMATH as _FASTMATH
from fusec.backends.numba_cpu.matvec import run1, run2, run3


@njit(inline="always")
def check_blocks(a, q):
    if q.shape[2] != BLOCK or a.shape[1] != q.shape[1] * BLOCK:
        raise ValueError("int8 matmul: weights must be [N, K/32, 32] for activations [M, K]")


@njit(inline="always")
def _contiguous(q):
    """q itself when C-contiguous, else a copy that is (int8 weights and scales are, unless a caller sliced
    them; activations usually are)."""
    return q if q.flags.c_contiguous else np.ascontiguousarray(q)


@njit(inline="always")
def quantize_rows(a, q):
    """Activations a[M, K] as int8 blocks of 32 like the weights q[N, K/32, 32]: (xq int8 [M, K/32, 32],
    xs float32 [M, K/32]) with a ~ xq * xs. Per block, xs = max|a| / 127 and xq = rint(a * (127 / max|a|))
    (ties to even); an all-zero block has scale 0, a block holding inf or NaN scale NaN (and xq 0), so the
    non-finite value shows in every product that reads it. `fusec.semantics.quantize_activations`
    computes the same values (`int8_dot.quantize_block`)."""
    check_blocks(a, q)
    ac = _contiguous(a)
    m_rows, blocks = a.shape[0], q.shape[1]
    xq = np.empty((m_rows, blocks, BLOCK), np.int8)
    xs = np.empty((m_rows, blocks), np.float32)
    for m in range(m_rows):
        for b in range(blocks):
            quantize_block(ac, xq, xs, m, b)
    return xq, xs


# c[M, N] = quantized(a[M, K]) @ (q * s)^T for a few rows M, with int8 weights q[N, K/32, 32] and float32
# block scales s[N, K/32, 1] (see the module docstring), weight rows `group` at a time (a constant: the
# kernel's `matvec_group` tile); `matvec2_int8` and `matvec3_int8` run two or three matrices that read the
# same activations (quantized once) in one parallel loop (as `matvec.matvec2`).
@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec_int8(a, q, s, c, group):
    literally(group)
    run1(group, quantize_rows(a, q), (_contiguous(q), _contiguous(s)), c)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec2_int8(a, q0, s0, q1, s1, c0, c1, group):
    literally(group)
    x = quantize_rows(a, q0)
    check_blocks(a, q1)
    run2(group, x, (_contiguous(q0), _contiguous(s0)), (_contiguous(q1), _contiguous(s1)), c0, c1)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec3_int8(a, q0, s0, q1, s1, q2, s2, c0, c1, c2, group):
    literally(group)
    x = quantize_rows(a, q0)
    check_blocks(a, q1)
    check_blocks(a, q2)
    run3(group, x, (_contiguous(q0), _contiguous(s0)), (_contiguous(q1), _contiguous(s1)),
         (_contiguous(q2), _contiguous(s2)), c0, c1, c2)


@njit(parallel=True, cache=True)
def _dequantize_rows(q, s, n0, n1, out):
    """out[n - n0, 32b + i] = q[n, b, i] * s[n, b] for rows n0..n1."""
    blocks, width = q.shape[1], q.shape[2]
    for n in prange(n1 - n0):
        for b in range(blocks):
            scale = s[n0 + n, b, 0]
            for i in range(width):
                out[n, b * width + i] = np.float32(q[n0 + n, b, i]) * scale


@njit(cache=True, nogil=True)
def quantized_activations(a, q):
    """a[M, K] quantized to int8 blocks of 32 (`quantize_rows`) and widened back to float32: what an int8
    weight's GEMM multiplies (`semantics.quantize_activations`). Serial: 0.15 ms at 256 x 2048 on one core,
    less than a parallel region costs on a busy machine (a thread that starts late holds up the others)."""
    xq, xs = quantize_rows(a, q)
    x = np.empty((a.shape[0], xq.shape[1] * BLOCK), np.float32)
    for m in range(a.shape[0]):
        for b in range(xq.shape[1]):
            widen_block(xq, m, b, xs[m, b], x, m)
    return x


@njit(cache=True)
def gemm_int8(a, q, s, c):
    """c = quantized(a) @ (q * s)^T for many rows (prefill), what `matvec_int8` computes: the activations
    quantized and widened back, a block of weight rows dequantized to a float32 tile, then one GEMM per
    tile (it stays in cache between the two). NumPy's OpenBLAS, for when MKL is not used: with MKL,
    `gemm_widen.gemm_int8_mkl` does this per thread (OpenBLAS's own threads would fight Numba's)."""
    x = quantized_activations(a, q)
    n_dim, blocks, width = q.shape
    block = 256
    tile = np.empty((min(block, n_dim), blocks * width), np.float32)
    for n0 in range(0, n_dim, block):
        n1 = min(n_dim, n0 + block)
        _dequantize_rows(q, s, n0, n1, tile)
        gemm(x, tile[: n1 - n0], c[:, n0:n1], True)
