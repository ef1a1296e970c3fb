"""Row operations of the decode attention loops (`attention.py`) with explicit 16-lane float32 vectors
(`simd.row_intrinsics`): the Q.K dot product, the P.V row update and the check of a masked value row for
inf and nan, each row named by its array and the index of its leading axes; and `prefetch_rows`, which
asks for rows read soon. Generated kernels leave
`reassoc` out, so a running sum never vectorizes; and LLVM unrolls a head-sized loop fully, then cannot
tell the output row apart from the value row, so the update stays scalar too. Arrays that are not
C-contiguous float32 take plain loops (the same answers up to the order of the dot's sum)."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from fusec.backends.numba_cpu.simd import I8, prefetch, row_intrinsics

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


@intrinsic
def prefetch_rows(typingctx, a, r0, n):
    """Ask for the cache lines of rows r0..r0+n-1 of a 2-d array whose rows are one after the other, into
    the L2 cache (a hint: rows past the end cost a wasted request, no fault)."""
    if not (isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        stride = cgutils.unpack_tuple(builder, ary.strides, 2)[0]
        r0v = context.cast(builder, args[1], signature.args[1], types.intp)
        nv = context.cast(builder, args[2], signature.args[2], types.intp)
        base = builder.gep(builder.bitcast(ary.data, I8.as_pointer()), [builder.mul(r0v, stride)])
        lines = builder.udiv(builder.add(builder.mul(nv, stride), ir.Constant(nv.type, 63)), ir.Constant(nv.type, 64))
        with cgutils.for_range(builder, lines) as loop:
            prefetch(builder, builder.gep(base, [builder.mul(loop.index, ir.Constant(nv.type, 64))]), into_l1=False)
        return context.get_dummy_value()
    return types.none(a, r0, n), codegen
