"""BLAS inside njit: NumPy's own OpenBLAS `sgemm`, called from generated kernels.

Numba's `np.dot` goes through SciPy's BLAS, which on some machines is several times slower than the
OpenBLAS NumPy ships; so kernels call NumPy's `cblas_sgemm` directly. The call is bound by symbol name
(`ExternalFunction`), not by address, so Numba's on-disk cache stays valid across processes.
"""
from __future__ import annotations

import glob
import os

import llvmlite.binding as llvm
from llvmlite import ir as llvm_ir
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.ufunc.parallel import _launch_threads

# A kernel without a parallel loop of its own may call a parallel one here (matvec). Loaded from Numba's
# cache, such a kernel does not start the threading layer, and the first parallel region would then
# jump through null pointers (a segfault): start it now, before any cached kernel can run.
_launch_threads()


def _find_sgemm() -> str:
    libs = os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "*openblas*.so*"))):
        llvm.load_library_permanently(path)
        for symbol in ("scipy_cblas_sgemm64_", "cblas_sgemm64_", "cblas_sgemm"):
            if llvm.address_of_symbol(symbol):
                return symbol
    raise ImportError("fusec's numba backend needs NumPy built with OpenBLAS (cblas_sgemm not found)")


_SYMBOL = _find_sgemm()
_INT = types.int64 if "64" in _SYMBOL else types.int32
_sgemm = types.ExternalFunction(_SYMBOL, types.void(
    types.int32, types.int32, types.int32, _INT, _INT, _INT, types.float32, types.voidptr, _INT,
    types.voidptr, _INT, types.float32, types.voidptr, _INT))
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


@intrinsic
def _ptr(typingctx, arr):
    """The address of an array's first element, as a void pointer."""
    def codegen(context, builder, signature, args):
        ary = context.make_array(arr)(context, builder, args[0])
        return builder.bitcast(ary.data, cgutils.voidptr_t)
    return types.voidptr(arr), codegen


@njit(cache=True)
def gemm(a, b, c, b_transposed):
    """c[M, N] = a[M, K] @ B, where B is b[K, N], or b[N, K] transposed when `b_transposed`.

    Every operand must have unit stride in its last axis (row-major rows); row strides may differ."""
    m, k = a.shape
    n = c.shape[1]
    _sgemm(ROW_MAJOR, NO_TRANS, TRANS if b_transposed else NO_TRANS, m, n, k, np.float32(1.0),
           _ptr(a), a.strides[0] // 4, _ptr(b), b.strides[0] // 4, np.float32(0.0), _ptr(c), c.strides[0] // 4)


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM vectorize the function this is called in with 512-bit vectors where the CPU has them.

    LLVM prefers 256-bit vectors on AVX-512 CPUs (a guard against frequency drops in mixed code); widening
    int8 or bf16 weights then takes twice the shuffles per weight, and those (port 5) bound the low-precision
    matrix-vector loops. A string function attribute, so it changes nothing on a CPU without AVX-512. Call
    it inside the parallel loop's body: that body is a function of its own."""
    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')  # (llvmlite knows no string attrs)
        return context.get_dummy_value()
    return types.none(), codegen


@njit(inline="always")
def row_groups(w, rows):
    """Groups of `rows` rows of weight matrix w[N, K] (the last one maybe short): the unit the matrix-vector
    loops hand to a thread."""
    return (w.shape[0] + rows - 1) // rows


@intrinsic
def _bits_as_f32(typingctx, bits):
    """Reinterpret a uint32 as the float32 with the same bits."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_bits(typingctx, value):
    """Reinterpret a float32 as the uint32 with the same bits."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.IntType(32))
    return types.uint32(types.float32), codegen


@njit(inline="always")
def bf16(x):
    """A bfloat16 value held in a uint16 (its top 16 bits of float32) widened to float32."""
    return _bits_as_f32(np.uint32(x) << np.uint32(16))


def load_bf16(x):
    """A bfloat16 value as float32, whichever way its array holds it: weights are their bits (uint16),
    activations are float32 already rounded to bfloat16 (see `fusec.dtypes`)."""
    raise NotImplementedError("load_bf16 runs inside njit code only")


@overload(load_bf16, inline="always")
def _load_bf16(x):
    if isinstance(x, types.Float):
        return lambda x: np.float32(x)
    return lambda x: bf16(x)


@njit(inline="always")
def rbf16(x):
    """float32 `x` rounded to the nearest bfloat16 (ties to even), as float32: what torch stores after
    every bfloat16 op (the same rounding as `fusec.dtypes.round_bf16`); NaN stays NaN, overflow is inf."""
    if x != x:
        return x
    bits = _f32_as_bits(x)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return _bits_as_f32(bits)


@njit(parallel=True, cache=True)
def _widen_rows(w, n0, n1, out):
    for n in prange(n1 - n0):
        for k in range(w.shape[1]):
            out[n, k] = bf16(w[n0 + n, k])


@njit(cache=True)
def gemm_bf16(a, w, c):
    """c = a @ w^T with bfloat16 weights w[N, K]: widen a block of weight rows, then one BLAS call each."""
    n_dim, k_dim = w.shape
    block = 256
    tile = np.empty((min(block, n_dim), k_dim), np.float32)
    for n0 in range(0, n_dim, block):
        n1 = min(n_dim, n0 + block)
        _widen_rows(w, n0, n1, tile)
        gemm(a, tile[: n1 - n0], c[:, n0:n1], True)


@njit(inline="always")
def checked_index(j, bound, err, take):
    """`j` when it lies in [0, bound); else 0 (never a read out of bounds), with gather number `take` + 1
    and `j` recorded in `err` for the runtime to raise IndexError after the kernel. A raise here would
    make Numba run the parallel loop around it serially."""
    if j >= 0 and j < bound:
        return j
    err[0] = take + 1
    err[1] = j
    return j - j

