"""Row operations of the decode attention loops (`attention.py`) with explicit 16-lane float32 vectors
(`simd.row_intrinsics`): the Q.K dot product, the P.V row update and the check of a masked value row for
inf and nan, each row named by its array and the index of its leading axes. Generated kernels leave
`reassoc` out, so a running sum never vectorizes; and LLVM unrolls a head-sized loop fully, then cannot
tell the output row apart from the value row, so the update stays scalar too. Arrays that are not
C-contiguous float32 take plain loops (the same answers up to the order of the dot's sum)."""
from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from fusec.backends.numba_cpu.simd import row_intrinsics

_dot, _axpy, _finite = row_intrinsics()


def _vector(*arrays) -> bool:
    return all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C" for a in arrays)


def row_dot(x, xi, y, yi):
    """sum(x[xi] * y[yi]) over the rows' last axis (a multiple of 16 long)."""
    return np.float32(np.dot(x[xi], y[yi]))


def row_axpy(o, oi, v, vi, p):
    """o[oi] += p * v[vi] over the rows' last axis (a multiple of 16 long)."""
    o[oi] += p * v[vi]


def row_finite(x, xi):
    """Whether every element of x[xi] (a row a multiple of 16 long) is finite."""
    return bool(np.isfinite(x[xi]).all())


@overload(row_dot, jit_options={"fastmath": {"contract"}})
def _row_dot(x, xi, y, yi):
    if _vector(x, y):
        return lambda x, xi, y, yi: _dot(x, xi, y, yi)

    def scalar(x, xi, y, yi):
        s = np.float32(0.0)
        for d in range(x.shape[-1]):
            s += x[xi + (d,)] * y[yi + (d,)]
        return s
    return scalar


@overload(row_axpy, jit_options={"fastmath": {"contract"}})
def _row_axpy(o, oi, v, vi, p):
    if _vector(o, v):
        return lambda o, oi, v, vi, p: _axpy(o, oi, v, vi, p)

    def scalar(o, oi, v, vi, p):
        for e in range(o.shape[-1]):
            o[oi + (e,)] += p * v[vi + (e,)]
    return scalar


@overload(row_finite)
def _row_finite(x, xi):
    if _vector(x):
        return lambda x, xi: _finite(x, xi)

    def scalar(x, xi):
        for e in range(x.shape[-1]):
            if not np.isfinite(x[xi + (e,)]):
                return False
        return True
    return scalar
