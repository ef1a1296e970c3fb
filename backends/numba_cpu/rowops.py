"""Row operations of the decode attention loops (`attention.py`) with explicit 16-lane float32 vectors
(`simd.row_intrinsics`): the Q.K dot product, the P.V row update and the check of a masked value row for
inf and nan, each row named by its array and the index of its leading axes; `weighted_rows`, the P.V
update of a block of keys at once; and `prefetch_rows`, which asks for rows read soon. Generated kernels
leave `reassoc` out, so a running sum never vectorizes; and LLVM unrolls a head-sized loop fully, then cannot
tell the output row apart from the value row, so the update stays scalar too. Arrays that are not
C-contiguous float32 take plain loops (the same answers up to the order of the dot's sum)."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from fusec.backends.numba_cpu.simd import I8, LANES, V16F, at_byte, fma_into, prefetch, row_intrinsics, splat

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
        first = builder.mul(r0v, stride)  # bytes
        lines = builder.udiv(builder.add(builder.mul(nv, stride), ir.Constant(nv.type, 63)), ir.Constant(nv.type, 64))
        with cgutils.for_range(builder, lines) as loop:
            line = builder.add(first, builder.mul(loop.index, ir.Constant(nv.type, 64)))
            prefetch(builder, at_byte(builder, ary.data, line, I8), into_l1=False)
        return context.get_dummy_value()
    return types.none(a, r0, n), codegen


@intrinsic
def weighted_rows(typingctx, o, r, v, j0, n, p):
    """o[r] += sum(p[j] * v[j0 + j] for j < n), over the rows' last axis (a multiple of 16 long): o and v
    2-d, p 1-d, all C-contiguous float32. The output row's vectors stay in registers while the keys go by,
    four vectors side by side (a vector left over: two accumulators, even and odd keys), where `row_axpy`
    per key loads and stores the row: a chain through memory per key."""
    if not (all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C" for a in (o, v, p))
            and o.ndim == 2 and v.ndim == 2 and p.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        ao, av, ap = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 5))
        ri, j0i, ni = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 3, 4))

        def const(x):
            return ir.Constant(cgutils.intp_t, x)
        width = cgutils.unpack_tuple(builder, ao.shape, 2)[1]
        vstride = builder.udiv(cgutils.unpack_tuple(builder, av.strides, 2)[0], const(4))
        orow = builder.gep(ao.data, [builder.mul(ri, width)])
        vrows = builder.gep(av.data, [builder.mul(j0i, vstride)])
        chunks = builder.udiv(width, const(LANES))

        def vec(ptr, offset):  # the V16F at element `offset` of a float32 pointer
            return builder.bitcast(builder.gep(ptr, [offset]), V16F.as_pointer())

        def pass_over_keys(first, count, per_key):
            """Vectors first..first+count-1 of the row, `per_key` accumulators a vector (keys alternate)."""
            at = [builder.mul(builder.add(first, const(c)), const(LANES)) for c in range(count)]
            accs = [[cgutils.alloca_once(builder, V16F) for _ in range(per_key)] for _ in range(count)]
            for c, slots in enumerate(accs):
                builder.store(builder.load(vec(orow, at[c]), align=4), slots[0])
                for slot in slots[1:]:
                    builder.store(ir.Constant(V16F, [0.0] * LANES), slot)

            def add_key(j, k):  # accumulators k += p[j] * v[j0 + j]
                pj = splat(builder, builder.load(builder.gep(ap.data, [j])))
                row = builder.gep(vrows, [builder.mul(j, vstride)])
                for c, slots in enumerate(accs):
                    fma_into(builder, slots[k], pj, builder.load(vec(row, at[c]), align=4))
            steps = builder.udiv(ni, const(per_key))
            with cgutils.for_range(builder, steps) as loop:
                for k in range(per_key):
                    add_key(builder.add(builder.mul(loop.index, const(per_key)), const(k)), k)
            with cgutils.for_range(builder, builder.sub(ni, builder.mul(steps, const(per_key)))) as tail:
                add_key(builder.add(builder.mul(steps, const(per_key)), tail.index), 0)
            for c, slots in enumerate(accs):
                total = builder.load(slots[0])
                for slot in slots[1:]:
                    total = builder.fadd(total, builder.load(slot), flags=["contract"])
                builder.store(total, vec(orow, at[c]), align=4)

        fours = builder.udiv(chunks, const(4))
        with cgutils.for_range(builder, fours) as group:
            pass_over_keys(builder.mul(group.index, const(4)), 4, 1)
        with cgutils.for_range(builder, builder.sub(chunks, builder.mul(fours, const(4)))) as single:
            pass_over_keys(builder.add(builder.mul(fours, const(4)), single.index), 1, 2)
        return context.get_dummy_value()
    return types.none(o, r, v, j0, n, p), codegen
