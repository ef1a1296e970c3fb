"""int8 matrix-vector and GEMM kernels: int8 weights times int8-quantized activations (Q8_0 x Q8_0).

Weights (`passes.weights`, llama.cpp's Q8_0 layout): q[N, K/32, 32] int8 and scales s[N, K/32, 1] float32,
a weight being q * s. A matrix-vector call first quantizes its activation rows the same way, once for all
the matrices it runs (`quantize_rows`: x[M, K/32, 32] as int16 and scales xs[M, K/32]); each block's dot
product is then a sum of integer products, exact in int32, times s * xs, summed in float32. What this
computes is defined by the reference semantics (`fusec.semantics.quantize_activations`): a matmul that
reads an int8 weight (marked `quantize="int8"` by the weights pass) multiplies by its activations
quantized that way. Prefill (`gemm_int8`) computes the same: quantized activations times dequantized
weights, in one BLAS GEMM per block of weight rows.

Why integer products: widening every weight to float32 (sign-extend, convert, scale, FMA) is shuffle- and
port-bound and read int8 weights at half fp32's bytes per second, so int8 decode barely beat bf16. Here a
block of 32 weights of one row costs a sign extension to int16 and one `pmaddwd` (16 pair sums in int32
lanes), a conversion and one FMA into 16 float32 lanes per row, reduced once at the end (`_dot_rows`).
LLVM does not form `pmaddwd` from Numba's code (Numba widens integer products to 64 bits, and from 32-bit
products LLVM emits `pmulld`), so the loop over blocks is written in LLVM IR and calls the x86 intrinsic
where the CPU has it; elsewhere the same IR in portable form (products of sign-extended lanes, pairs added).
Measured side by side (one thread, one activation row, stories110M's shapes): the time of fp32's product
over int8's went from 1.4-2.0x (float32 widening) to 2.5-4.4x.
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import config, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fusec.backends.numba_cpu.blas import gemm, row_groups, wide_vectors
from fusec.backends.numba_cpu.simd import (I8, I16, I32, V16F, V16I, Arrays, accumulators, fma_into, hsum, intp_args,
                                           lanes, splat)

_FASTMATH = {"reassoc", "contract"}  # vectorized sums; NaN and inf keep their meaning
BLOCK = 32  # int8 values per scale (`passes.weights.BLOCK`)
ROWS = 4    # weight rows per dot call: four independent FMA chains, one activation load for all four
def _target_features() -> set[str]:
    """The CPU features Numba compiles for: the host's, or those NUMBA_CPU_FEATURES names when
    NUMBA_CPU_NAME picks another CPU (then no x86 intrinsic unless named)."""
    if config.CPU_NAME:
        return {f[1:] for f in (config.CPU_FEATURES or "").split(",") if f.startswith("+")}
    return {name for name, on in llvm.get_host_cpu_features().items() if on}


def _pmaddwd_kind() -> str:
    features = _target_features()
    if "avx512bw" in features:
        return "avx512"
    return "avx2" if "avx2" in features else "portable"


PMADDWD = _pmaddwd_kind()  # read when a kernel is compiled (tests set it to compile the other forms)


def _pairs(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """<16 x i32>: a[2j] * b[2j] + a[2j+1] * b[2j+1] of <32 x i16> vectors a and b."""
    module = builder.module
    if PMADDWD == "avx512":
        fn = cgutils.get_or_insert_function(module, ir.FunctionType(V16I, [a.type, b.type]),
                                            "llvm.x86.avx512.pmaddw.d.512")
        return builder.call(fn, [a, b])
    if PMADDWD == "avx2":
        fn = cgutils.get_or_insert_function(
            module, ir.FunctionType(ir.VectorType(I32, 8), [ir.VectorType(I16, 16)] * 2), "llvm.x86.avx2.pmadd.wd")
        halves = [builder.call(fn, [lanes(builder, a, h, 16), lanes(builder, b, h, 16)]) for h in (0, 16)]
        return builder.shuffle_vector(halves[0], halves[1], ir.Constant(V16I, list(range(16))))
    products = builder.mul(builder.sext(a, ir.VectorType(I32, 32)), builder.sext(b, ir.VectorType(I32, 32)))
    return builder.add(lanes(builder, products, 0, 16, 2), lanes(builder, products, 1, 16, 2))


def _dot_rows(count: int):
    """An intrinsic dot(q, s, xq, xs, n0, m): the tuple of `count` float32 dot products of activation row m
    (int16 xq[M, B, 32], scales xs[M, B]) with weight rows n0.. of q[N, B, 32] (int8) and s[N, B, 1]; a
    block's 32 values are read as one vector, so q and xq must be C-contiguous (callers make sure)."""
    @intrinsic
    def dot(typingctx, q, s, xq, xs, n0, m):
        arrays = (q, s, xq, xs)
        want = ((types.int8, 3), (types.float32, 3), (types.int16, 3), (types.float32, 2))
        if not all(isinstance(t, types.Array) and (t.dtype, t.ndim) == w for t, w in zip(arrays, want)):
            return None
        if not (isinstance(n0, types.Integer) and isinstance(m, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            arrays = Arrays(context, builder, signature, args, 4)  # q, s, xq, xs
            n0v, mv = intp_args(context, builder, signature, args, 4)
            zero = ir.Constant(n0v.type, 0)
            accs = accumulators(builder, count)
            with cgutils.for_range(builder, arrays.shape(0, 1)) as loop:
                b = loop.index
                x = arrays.load(2, [mv, b, zero], ir.VectorType(I16, 32))
                xs = arrays.load(3, [mv, b])
                for r, acc in enumerate(accs):
                    n = builder.add(n0v, ir.Constant(n0v.type, r))
                    w = builder.sext(arrays.load(0, [n, b, zero], ir.VectorType(I8, 32)), ir.VectorType(I16, 32))
                    dots = builder.sitofp(_pairs(builder, w, x), V16F)
                    fma_into(builder, acc, dots, splat(builder, builder.fmul(arrays.load(1, [n, b, zero]), xs)))
            sums = [hsum(builder, builder.load(a)) for a in accs]
            return context.make_tuple(builder, signature.return_type, sums)
        return types.UniTuple(types.float32, count)(q, s, xq, xs, n0, m), codegen
    return dot


_dot4 = _dot_rows(ROWS)
_dot1 = _dot_rows(1)


@njit(inline="always")
def _rows_int8(xq, xs, q, s, c, n0):
    """c[:, n0:n0+4] = the activations' rows (quantized: xq, xs) times int8 weight rows n0..n0+3."""
    rows = min(ROWS, q.shape[0] - n0)
    for m in range(xq.shape[0]):
        if rows == ROWS:
            d = _dot4(q, s, xq, xs, n0, m)
            c[m, n0] = d[0]
            c[m, n0 + 1] = d[1]
            c[m, n0 + 2] = d[2]
            c[m, n0 + 3] = d[3]
        else:
            for r in range(rows):
                c[m, n0 + r] = _dot1(q, s, xq, xs, n0 + r, m)[0]


@njit(inline="always")
def _check(a, q):
    if q.shape[2] != BLOCK or a.shape[1] != q.shape[1] * BLOCK:
        raise ValueError("int8 matrix-vector: weights must be [N, K/32, 32] for activations [M, K]")


@njit(inline="always")
def quantize_rows(a, q):
    """Activations a[M, K] as int8 blocks of 32 like the weights q[N, K/32, 32]: (xq int16 [M, K/32, 32],
    xs float32 [M, K/32]) with a ~ xq * xs. Per block, xs = max|a| / 127 and xq = rint(a * (127 / max|a|))
    (ties to even); an all-zero block has scale 0, a block holding inf or NaN scale NaN (and xq 0), so the
    non-finite value shows in every product that reads it. `fusec.semantics.quantize_activations`
    computes the same values."""
    _check(a, q)
    m_rows, blocks = a.shape[0], q.shape[1]
    xq = np.empty((m_rows, blocks, BLOCK), np.int16)
    xs = np.empty((m_rows, blocks), np.float32)
    for m in range(m_rows):
        for b in range(blocks):
            amax = np.float32(0.0)
            bad = False
            for i in range(BLOCK):  # branch-free, so that LLVM vectorizes it
                v = abs(a[m, b * BLOCK + i])
                bad |= (v != v) | (v == np.inf)
                amax = max(amax, v)
            finite = not bad
            if finite and amax > 0:
                inv = np.float32(127.0) / amax
                for i in range(BLOCK):
                    xq[m, b, i] = np.int16(np.rint(a[m, b * BLOCK + i] * inv))
                xs[m, b] = amax / np.float32(127.0)
            else:
                for i in range(BLOCK):
                    xq[m, b, i] = 0
                xs[m, b] = np.float32(0.0) if finite else np.float32(np.nan)
    return xq, xs


@njit(inline="always")
def _contiguous(q):
    """q itself when C-contiguous, else a copy that is (int8 weights are, unless a caller sliced them)."""
    return q if q.flags.c_contiguous else np.ascontiguousarray(q)


# c[M, N] = quantized(a[M, K]) @ (q * s)^T for a few rows M, with int8 weights q[N, K/32, 32] and float32
# block scales s[N, K/32, 1] (see the module docstring); `matvec2_int8` and `matvec3_int8` run two or three
# matrices that read the same activations (quantized once) in one parallel loop (as `blas.matvec2`).
@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec_int8(a, q, s, c):
    xq, xs = quantize_rows(a, q)
    qc = _contiguous(q)
    for g in prange(row_groups(qc)):
        wide_vectors()
        _rows_int8(xq, xs, qc, s, c, 4 * g)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec2_int8(a, q0, s0, q1, s1, c0, c1):
    xq, xs = quantize_rows(a, q0)
    _check(a, q1)
    p0, p1 = _contiguous(q0), _contiguous(q1)
    g0 = row_groups(p0)
    for g in prange(g0 + row_groups(p1)):
        wide_vectors()
        if g < g0:
            _rows_int8(xq, xs, p0, s0, c0, 4 * g)
        else:
            _rows_int8(xq, xs, p1, s1, c1, 4 * (g - g0))


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def matvec3_int8(a, q0, s0, q1, s1, q2, s2, c0, c1, c2):
    xq, xs = quantize_rows(a, q0)
    _check(a, q1)
    _check(a, q2)
    p0, p1, p2 = _contiguous(q0), _contiguous(q1), _contiguous(q2)
    g0 = row_groups(p0)
    g1 = g0 + row_groups(p1)
    for g in prange(g1 + row_groups(p2)):
        wide_vectors()
        if g < g0:
            _rows_int8(xq, xs, p0, s0, c0, 4 * g)
        elif g < g1:
            _rows_int8(xq, xs, p1, s1, c1, 4 * (g - g0))
        else:
            _rows_int8(xq, xs, p2, s2, c2, 4 * (g - g1))


@njit(parallel=True, cache=True)
def _dequantize_rows(q, s, n0, n1, out):
    """out[n - n0, 32b + i] = q[n, b, i] * s[n, b] for rows n0..n1."""
    blocks, width = q.shape[1], q.shape[2]
    for n in prange(n1 - n0):
        for b in range(blocks):
            scale = s[n0 + n, b, 0]
            for i in range(width):
                out[n, b * width + i] = np.float32(q[n0 + n, b, i]) * scale


@njit(parallel=True, cache=True)
def _dequantized_activations(xq, xs):
    """The float32 activations [M, K] that quantized rows (xq, xs) stand for."""
    m_rows, blocks, width = xq.shape
    out = np.empty((m_rows, blocks * width), np.float32)
    for m in prange(m_rows):
        for b in range(blocks):
            for i in range(width):
                out[m, b * width + i] = np.float32(xq[m, b, i]) * xs[m, b]
    return out


@njit(cache=True)
def gemm_int8(a, q, s, c):
    """c = quantized(a) @ (q * s)^T for many rows (prefill), what `matvec_int8` computes: the activations
    quantized and widened back, a block of weight rows dequantized to a float32 tile, then one GEMM per
    tile (it stays in cache between the two)."""
    xq, xs = quantize_rows(a, q)
    x = _dequantized_activations(xq, xs)
    n_dim, blocks, width = q.shape
    block = 256
    tile = np.empty((min(block, n_dim), blocks * width), np.float32)
    for n0 in range(0, n_dim, block):
        n1 = min(n_dim, n0 + block)
        _dequantize_rows(q, s, n0, n1, tile)
        gemm(x, tile[: n1 - n0], c[:, n0:n1], True)
