"""BLAS inside njit: NumPy's own OpenBLAS `sgemm`, called from generated kernels.

Numba's `np.dot` goes through SciPy's BLAS, which on some machines is several times slower than the
OpenBLAS NumPy ships; so kernels call NumPy's `cblas_sgemm` directly. The call is bound by symbol name
(`ExternalFunction`), not by address, so Numba's on-disk cache stays valid across processes.
"""
from __future__ import annotations

import glob
import os

import llvmlite.binding as llvm
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


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
