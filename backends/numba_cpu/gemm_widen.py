"""Prefill GEMMs over weights stored narrow (bfloat16 bits, int8 blocks): each thread widens its own
weight rows to float32, a cache-sized tile at a time, and multiplies each tile by one single-threaded
GEMM (oneDNN's where it is installed, else MKL's sgemm: `mkl.product_block`).

Why: a GEMM reads every weight M times, so at prefill the weights' bytes hardly matter; what matters is
that the widening costs little next to the multiply and that both run on every core. The tile scheme of
`mkl.gemm3_mkl`: the output columns (= weight rows) of all the kernel's products split into one block per
Numba thread; each thread widens `tile_rows` of its rows into a buffer of its own (about TILE_BYTES, so it
is still in that core's L2 cache when sgemm reads it) and calls a single-threaded sgemm on it. Before,
int8 dequantized each 256-row block in a parallel loop, then called NumPy's OpenBLAS from one thread,
whose own thread pool then fought Numba's for the cores: the tinyllama_1b block's 256-token prefill took
7.8x fp32's time on a quiet machine. Measured after (2 threads, 4 rounds alternating with the code before,
each format's time over fp32's in the same process, on a busy 2-core machine, load 6-17): int8 1.03-1.23x
(median 1.15x; before 12-14x there), bf16 1.08-1.25x (median 1.18x; MKL's emulated bf16 GEMM 1.27-1.30x).

int8 (`gemm3_int8_mkl`): the activations are quantized as the matrix-vector kernels quantize them
(`int8.quantized_activations`, what the reference computes) and widened back to float32 once per call, for all the
products that read them; each weight tile is q * s. bf16 (`gemm3_bf16w_mkl`): a tile is the weights'
bits shifted into float32's top half, the activations float32 as they are (the reference's
`cast(w) @ x`).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from fusec.backends.numba_cpu.blas import bf16
from fusec.backends.numba_cpu.int8 import check_blocks, quantized_activations
from fusec.backends.numba_cpu.int8_dot import BLOCK, widen_block
from fusec.backends.numba_cpu.mkl import COLUMN_ALIGN, column_block, product_block, threads

# bytes of a thread's float32 weight tile, widened then multiplied. With MKL's sgemm, 128 KiB, 512 KiB and
# 2 MiB tiles were within the noise (tinyllama_1b's products at 256 rows, 2 threads, alternating). oneDNN
# pays a fixed cost per call (the callback, its packing): 256 x 2048 x 5632, 2 threads, medians of 7
# alternating rounds on a quiet machine with a 1 MiB L2 a core: int8 26.2 / 18.4 / 19.3 ms and bf16 25.3 /
# 17.1 / 18.9 ms with 512 KiB / 2 MiB / 8 MiB tiles (fp32 weights, nothing to widen: 16.2; MKL 33-36 each)
TILE_BYTES = 2 * 1024 * 1024


@njit(inline="always")
def tile_rows(k):
    """Weight rows per tile at K = k: TILE_BYTES of float32, a multiple of COLUMN_ALIGN, at least that."""
    rows = TILE_BYTES // (4 * max(k, 1)) // COLUMN_ALIGN * COLUMN_ALIGN
    return max(rows, COLUMN_ALIGN)


def widen_rows(w, n0, n1, out):
    """Weight rows [n0, n1) widened to float32 into out[:n1 - n0]: w the bf16 bits [N, K] (uint16) or an
    int8 weight's (q [N, K/32, 32], s [N, K/32, 1]), each value q * s."""
    raise NotImplementedError("gemm_widen.widen_rows runs inside njit code only")


@overload(widen_rows, inline="always")
def _widen_rows(w, n0, n1, out):
    if isinstance(w, types.BaseTuple):
        if w[0].layout == "C" and out.layout == "C":
            def int8_vectors(w, n0, n1, out):
                q, s = w
                for n in range(n1 - n0):
                    for b in range(q.shape[1]):
                        widen_block(q, n0 + n, b, s[n0 + n, b, 0], out, n)
            return int8_vectors

        def int8(w, n0, n1, out):
            q, s = w
            for n in range(n1 - n0):
                for b in range(q.shape[1]):
                    scale = s[n0 + n, b, 0]
                    for i in range(BLOCK):
                        out[n, b * BLOCK + i] = np.float32(q[n0 + n, b, i]) * scale
        return int8

    def bf16_bits(w, n0, n1, out):
        for n in range(n1 - n0):
            for k in range(w.shape[1]):
                out[n, k] = bf16(w[n0 + n, k])
    return bf16_bits


def weight_rows(w):
    """N of a weight in either format (see `widen_rows`)."""
    raise NotImplementedError("gemm_widen.weight_rows runs inside njit code only")


@overload(weight_rows, inline="always")
def _weight_rows(w):
    if isinstance(w, types.BaseTuple):
        return lambda w: w[0].shape[0]
    return lambda w: w.shape[0]


@njit(inline="always")
def _tiled_columns(x, w, c, lo, hi, first, tile):
    """The columns [lo, hi) of the concatenation that fall in c = x @ widened(w)^T, whose columns start
    at `first`: tile by tile, widened into `tile` and multiplied by one single-threaded GEMM (oneDNN's or
    MKL's sgemm, `mkl.product_block`)."""
    n0 = max(lo, first) - first
    n1 = min(hi, first + c.shape[1]) - first
    for t0 in range(n0, n1, tile.shape[0]):
        t1 = min(n1, t0 + tile.shape[0])
        widen_rows(w, t0, t1, tile)
        product_block(x, tile[: t1 - t0], c[:, t0:t1], True, 0.0)


@njit(parallel=True, cache=True, nogil=True)
def _gemm3(x, w0, c0, w1, c1, w2, c2):
    """c0, c1, c2 = x @ widened(w0)^T, x @ widened(w1)^T, x @ widened(w2)^T: one parallel loop over the
    columns of all three (as `mkl.gemm3_mkl`), each thread widening its rows a tile at a time."""
    n = c0.shape[1] + c1.shape[1] + c2.shape[1]
    block = column_block(n, threads())
    k = x.shape[1]
    rows = min(tile_rows(k), block)
    for t in prange((n + block - 1) // block):
        lo = t * block
        hi = min(n, lo + block)
        tile = np.empty((rows, k), np.float32)  # this thread's own
        _tiled_columns(x, w0, c0, lo, hi, 0, tile)
        _tiled_columns(x, w1, c1, lo, hi, c0.shape[1], tile)
        _tiled_columns(x, w2, c2, lo, hi, c0.shape[1] + c1.shape[1], tile)


# c = quantized(a) @ (q * s)^T for one, two or three int8 weights that read the same activations (Q, K and
# V; W1 and W3), quantized once: generated kernels call these at prefill when the GEMMs are MKL's
@njit(cache=True, nogil=True)
def gemm_int8_mkl(a, q0, s0, c0):
    x = quantized_activations(a, q0)
    _gemm3(x, (q0, s0), c0, (q0[:0], s0[:0]), c0[:, :0], (q0[:0], s0[:0]), c0[:, :0])


@njit(cache=True, nogil=True)
def gemm2_int8_mkl(a, q0, s0, c0, q1, s1, c1):
    x = quantized_activations(a, q0)
    check_blocks(x, q1)
    _gemm3(x, (q0, s0), c0, (q1, s1), c1, (q1[:0], s1[:0]), c1[:, :0])


@njit(cache=True, nogil=True)
def gemm3_int8_mkl(a, q0, s0, c0, q1, s1, c1, q2, s2, c2):
    x = quantized_activations(a, q0)
    check_blocks(x, q1)
    check_blocks(x, q2)
    _gemm3(x, (q0, s0), c0, (q1, s1), c1, (q2, s2), c2)


# c = a @ widen(w)^T for one, two or three bfloat16 weights (uint16 bits) that read the same activations
@njit(cache=True, nogil=True)
def gemm_bf16w_mkl(a, w0, c0):
    _gemm3(a, w0, c0, w0[:0], c0[:, :0], w0[:0], c0[:, :0])


@njit(cache=True, nogil=True)
def gemm2_bf16w_mkl(a, w0, c0, w1, c1):
    _gemm3(a, w0, c0, w1, c1, w1[:0], c1[:, :0])


@njit(cache=True, nogil=True)
def gemm3_bf16w_mkl(a, w0, c0, w1, c1, w2, c2):
    _gemm3(a, w0, c0, w1, c1, w2, c2)
