"""Helpers for the matrix-vector loops written in LLVM IR (`int8.py`, `lowp.py`): explicit vectors where
Numba's code does not vectorize the way the loop needs (integer pair products, bf16 widening with a
vector accumulator per row that is reduced once)."""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils

I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
LANES = 16  # float32 lanes of an accumulator (one 512-bit register, or two 256-bit ones)
V16F, V16I = ir.VectorType(F32, LANES), ir.VectorType(I32, LANES)
V32S = ir.VectorType(I16, 2 * LANES)  # the bits of 32 bf16 weights


class Arrays:
    """The arrays among an intrinsic's arguments, with element pointers and vector loads."""

    def __init__(self, context, builder, signature, args, count: int, positions: tuple = ()):
        """The first `count` arguments, or those at `positions` when given."""
        self.context, self.builder = context, builder
        positions = positions or tuple(range(count))
        self.types = [signature.args[i] for i in positions]
        self.arrays = [context.make_array(signature.args[i])(context, builder, args[i]) for i in positions]

    def shape(self, i: int, axis: int) -> ir.Value:
        return cgutils.unpack_tuple(self.builder, self.arrays[i].shape, self.types[i].ndim)[axis]

    def at(self, i: int, index: list) -> ir.Value:
        """A pointer to element `index` of array i."""
        t, a = self.types[i], self.arrays[i]
        return cgutils.get_item_pointer2(self.context, self.builder, a.data,
                                         cgutils.unpack_tuple(self.builder, a.shape, t.ndim),
                                         cgutils.unpack_tuple(self.builder, a.strides, t.ndim), t.layout, index)

    def load(self, i: int, index: list, vector: ir.VectorType | None = None) -> ir.Value:
        """Element `index` of array i, or the `vector` of consecutive elements starting there."""
        ptr = self.at(i, index)
        if vector is None:
            return self.builder.load(ptr)
        return self.builder.load(self.builder.bitcast(ptr, vector.as_pointer()), align=self.types[i].dtype.bitwidth // 8)


def intp_args(context, builder, signature, args, first: int) -> list[ir.Value]:
    """The integer arguments from position `first` on, as intp."""
    return [context.cast(builder, v, t, types.intp) for v, t in zip(args[first:], signature.args[first:])]


def lanes(builder: ir.IRBuilder, v: ir.Value, start: int, count: int, step: int = 1) -> ir.Value:
    """Lanes start, start + step, ... (count of them) of vector v."""
    idx = ir.Constant(ir.VectorType(I32, count), list(range(start, start + count * step, step)))
    return builder.shuffle_vector(v, v, idx)


def splat(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """A float32 broadcast to every lane of a V16F."""
    one = builder.insert_element(ir.Constant(V16F, ir.Undefined), x, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, ir.Constant(V16F, ir.Undefined), ir.Constant(V16I, [0] * LANES))


def accumulators(builder: ir.IRBuilder, count: int) -> list[ir.Value]:
    """`count` zeroed V16F accumulators (stack slots LLVM keeps in registers)."""
    return [cgutils.alloca_once_value(builder, ir.Constant(V16F, [0.0] * LANES)) for _ in range(count)]


def fma_into(builder: ir.IRBuilder, acc: ir.Value, a: ir.Value, b: ir.Value) -> None:
    """acc += a * b (one FMA: the kernels' `contract`)."""
    product = builder.fmul(a, b, flags=["contract"])
    builder.store(builder.fadd(builder.load(acc), product, flags=["contract"]), acc)


def hsum(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """The sum of a V16F's lanes (a halving tree; once per row, so its order does not matter)."""
    width = LANES
    while width > 1:
        width //= 2
        v = builder.fadd(lanes(builder, v, 0, width), lanes(builder, v, width, width))
    return builder.extract_element(v, ir.Constant(I32, 0))


def hsums(builder: ir.IRBuilder, vs: list[ir.Value]) -> list[ir.Value]:
    """The lane sums of several V16F at once, each by `hsum`'s tree (lane i plus lane i + width/2, width
    halving) so that a row's sum has the same bits whichever rows share its group, but with the halves of
    two vectors gathered into one (a transposed add, as ggml's) so that one add serves both: 8 rows take
    7 vector adds and 14 shuffles instead of 32 and 32 (and no insert per row). A part is (vector, rows,
    width): row r's lanes are r * width .. r * width + width - 1; a part left without a partner of as
    many rows (a group that is not a power of two) halves alone. Measured at stories15M's K = 288 (one
    thread, weights in L2, the dot loops alone alternating with `hsum` per row, CPU time): bf16 groups
    of 8 took 0.89-0.90x the time, fp32 0.97x, int8 groups of 16 0.97x."""
    parts = [(v, 1, LANES) for v in vs]
    width = LANES
    while width > 1:
        half, joined = width // 2, []
        while parts:
            a, rows = parts[0][:2]
            if len(parts) > 1 and parts[1][1] == rows:  # two parts of as many rows: one vector
                b, pair, parts = parts[1][0], 2, parts[2:]
            else:
                b, pair, parts = a, 1, parts[1:]
            low = [p * rows * width + r * width + i for p in range(pair) for r in range(rows) for i in range(half)]
            mask = [ir.Constant(ir.VectorType(I32, len(low)), [i + d for i in low]) for d in (0, half)]
            joined.append((builder.fadd(builder.shuffle_vector(a, b, mask[0]), builder.shuffle_vector(a, b, mask[1])),
                           pair * rows, half))
        parts, width = joined, half
    return [builder.extract_element(v, ir.Constant(I32, r)) for v, rows, _ in parts for r in range(rows)]


def at_byte(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, kind: ir.Type) -> ir.Value:
    """A pointer to a `kind` at byte `offset` from pointer `base` (a plain GEP: it may point past the array,
    as a prefetch's address does)."""
    return builder.bitcast(builder.gep(builder.bitcast(base, I8.as_pointer()), [offset]), kind.as_pointer())


def prefetch(builder: ir.IRBuilder, ptr: ir.Value, into_l1: bool = True) -> None:
    """Ask for the cache line at `ptr` (a hint: no fault, whatever the address), into the L1 cache or only
    into the L2. The matrix-vector loops fetch the next group of weight rows while they work on this one:
    a group's rows are short streams (a few hundred bytes to a few KB at int8 and bf16), too short for the
    hardware prefetcher to ramp up, and one core alone then reads far below the memory's bandwidth."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer()] + [I32] * 3),
                                        "llvm.prefetch.p0")
    read, locality, data = (ir.Constant(I32, v) for v in (0, 3 if into_l1 else 2, 1))
    builder.call(fn, [builder.bitcast(ptr, I8.as_pointer()), read, locality, data])


# bf16 pairs widened by interleaving their 16-bit halves with zeros (`vpunpcklwd` / `vpunpckhwd` on x86):
# per 128-bit lane L of 32 weights, the low unpack holds weights 8L..8L+3 and the high one 8L+4..8L+7,
# each the float32 whose top half is the weight's bits. The activations come in that order (`WIDENED`:
# `matvec.widened` permutes each whole chunk of 32 once per call, not once per chunk and group of rows).
_LOW = [8 * lane + t for lane in range(4) for t in range(4)]
_HIGH = [i + 4 for i in _LOW]
WIDENED = _LOW + _HIGH  # the activation read at position t of a chunk of 32: column WIDENED[t]


def _widen(builder: ir.IRBuilder, bits: ir.Value, order: list[int]) -> ir.Value:
    """The bf16 weights `order` of 32 (<32 x i16> bits) as 16 float32: each weight's bits above 16 zeros."""
    mask = [i for w in order for i in (0, 32 + w)]  # (low half 0, high half the weight) per float32
    zeros = ir.Constant(bits.type, [0] * 32)
    return builder.bitcast(builder.shuffle_vector(zeros, bits, ir.Constant(ir.VectorType(I32, 32), mask)), V16F)


# The prefetches of the matrix-vector loops, per format: each (groups of rows ahead, into the L1 cache or only
# the L2); "int8_scales" for the int8 rows' scales. Every format fetches four groups ahead into the L2.
# Measured on an AMD CPU with AVX-512 (Zen 4 class, 32 MB L3; weights cycled over 400 MB, 1 and 2
# threads, stories110M's and TinyLlama's shapes and stories15M's head, plans in turn, medians): against
# the plans before (fp32 the next group into the L1; bf16 three groups ahead into the L2 and the next
# into the L1; int8 the next group into the L1, scales not fetched) one thread read 1.3-1.9x the fp32
# bytes per second (14-15 -> 20-21 GB/s), 1.1-1.3x bf16's, 1.5-2x int8's; two threads 1.1-1.5x fp32's.
# Six or eight groups ahead measured alike; adding the next group into the L1 did not help. The plans
# before were measured on an Intel CPU (`float_dot`), where this one is not measured yet.
PREFETCH = {fmt: ((4, False),) for fmt in ("fp32", "bf16", "int8", "int8_scales")}


def float_dot(count: int, pairs: bool, acts: int = 1):
    """An intrinsic dot(w, a, n0, m): the tuple of `count` float32 dot products of activation row m of
    a[M, K] (float32) with weight rows n0.. of w, over the columns that fill whole chunks of 16 weights
    (`matvec.rest` adds the others). With `acts` > 1, those of activation rows m..m+acts-1, weight row
    by weight row (`count * acts` sums: row r's with activation row m + i at r * acts + i), each load of
    weights (and for bf16 its widening) serving `acts` products (`matvec_blocked`). w is float32 [N, K],
    or with `pairs` bf16 read as pairs[N, K/2] (uint32: the even element in the low half, the odd one in
    the high half); both C-contiguous (callers check). One accumulator per row and activation row,
    reduced once at the end; per chunk one load of each activation row, shared by the weight rows, and
    per weight row one load of weights and prefetches of the same place some groups of `count` rows on
    (`PREFETCH`): short streams the hardware prefetcher does not ramp up on.

    fp32: one FMA per 16 weights. bf16: a chunk is 32 weights (64 bytes), widened by two unpacks against
    zeros (`_widen`: no shift, mask or constant vector) and summed by two FMAs into the row's accumulator;
    the activations `a` come with each whole chunk of 32 in the unpacks' order (`WIDENED`, permuted once
    per call by `matvec.widened`). The rows' accumulators are reduced together (`hsums`). The loop before
    widened with a shift and a mask into two accumulators a row: more instructions per byte (a permutation
    constant reloaded every chunk, a mask), and bf16 rows, half as long as fp32's, leave it fewer bytes
    per row to spread each group's fixed work over. Measured side by side (bench_matvec's kernels,
    alternating calls, weights cycled over 64 MB, stories110M's and TinyLlama's shapes, the median of each
    round's ratio): bf16's bytes per second went from 0.83-0.96x fp32's to 0.89-1.03x on two threads, from
    0.91-1.01x to 0.95-1.05x on one (K = 768 gained most; there a two-thread call is short enough that its
    fork and join show).

    Per 64 bytes of a row the machine code is one FMA with its load and a prefetch for fp32; a load, two
    unpacks, two FMAs and a prefetch for bf16. The unpacks (one port on AVX-512) bound bf16 at about
    two cycles per 64 bytes, some 90 GB/s a core at 3 GHz, far above the 12-27 GB/s one core reads from
    the L3 cache or the memory: the loop waits on its loads, not on its arithmetic. So a shift and a mask
    (`vpslld`, `vpandd`: two ports, the activations split into even and odd columns) in place of the
    unpacks measured the same (within the noise, either way), and the prefetches decide. bf16's were the
    next group into the L2 only (into the L1 only: 0.95-1.02x from memory); fetching three groups
    ahead into the L2 and the next group into the L1 measured 1.01-1.10x the bytes
    per second of the L2-only fetch with the weights cycled over 1 GB (memory), and 1.13x on stories15M's
    32000 x 288 head read again and again (L3); matrices small enough to stay in the L2 between calls lose
    up to 10% (one more instruction per line), which a decode step, reading each matrix once, never sees
    (one thread, the dot loop alone, variants alternating, medians of 80 rounds)."""
    from numba.extending import intrinsic
    elem, per = (types.uint32, 2) if pairs else (types.float32, 1)  # activations per weight element

    @intrinsic
    def dot(typingctx, w, a, n0, m):
        if not (isinstance(w, types.Array) and w.dtype == elem and w.ndim == 2
                and isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2):
            return None

        def codegen(context, builder, signature, args):
            arrays = Arrays(context, builder, signature, args, 2)
            n0v, mv = intp_args(context, builder, signature, args, 2)
            intp = n0v.type
            chunks = builder.udiv(arrays.shape(0, 1), ir.Constant(intp, LANES))
            accs = accumulators(builder, count * acts)
            row_bytes = builder.mul(arrays.shape(0, 1), ir.Constant(intp, 4))
            aheads = [(builder.mul(row_bytes, ir.Constant(intp, groups * count)), into_l1)
                      for groups, into_l1 in PREFETCH["bf16" if pairs else "fp32"]]
            with cgutils.for_range(builder, chunks) as loop:
                j = builder.mul(loop.index, ir.Constant(intp, LANES))
                xs = [arrays.load(1, [builder.add(mv, ir.Constant(intp, i)), builder.mul(j, ir.Constant(intp, per))],
                                  ir.VectorType(F32, per * LANES)) for i in range(acts)]
                if pairs:  # already in the unpacks' order (`WIDENED`): each row's low and high halves
                    xs = [(lanes(builder, x, 0, LANES), lanes(builder, x, LANES, LANES)) for x in xs]
                for r in range(count):
                    row = arrays.at(0, [builder.add(n0v, ir.Constant(intp, r)), j])
                    for ahead, into_l1 in aheads:  # row r of a group ahead
                        prefetch(builder, at_byte(builder, row, ahead, I8), into_l1=into_l1)
                    if pairs:  # widened once, for every activation row
                        bits = builder.load(builder.bitcast(row, V32S.as_pointer()), align=4)
                        low, high = _widen(builder, bits, _LOW), _widen(builder, bits, _HIGH)
                        for i in range(acts):
                            fma_into(builder, accs[r * acts + i], xs[i][0], low)
                            fma_into(builder, accs[r * acts + i], xs[i][1], high)
                    else:
                        weights = builder.load(builder.bitcast(row, V16F.as_pointer()), align=4)
                        for i in range(acts):
                            fma_into(builder, accs[r * acts + i], xs[i], weights)
            sums = hsums(builder, [builder.load(acc) for acc in accs])
            return context.make_tuple(builder, signature.return_type, sums)
        return types.UniTuple(types.float32, count * acts)(w, a, n0, m), codegen
    return dot


def row_intrinsics():
    """(dot, axpy, finite), intrinsics over rows of float32 C-contiguous arrays named by an array and the
    index tuple of their leading axes (no view is made: a view per call costs more than the row's work):
    dot(x, xi, y, yi) the dot product of rows x[xi] and y[yi] in 16 lane sums (lane l the elements
    l mod 16, in order; added pairwise at the end); axpy(o, oi, v, vi, p): o[oi] += p * v[vi];
    finite(x, xi): whether every element of row x[xi] is finite. The rows' length, the arrays' last
    axis, is a multiple of 16 (callers check)."""
    from numba.extending import intrinsic

    def ok(*arrays):
        return all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C" for a in arrays)

    def row_pointer(context, builder, arrays, i, index_type, index):
        idx = [context.cast(builder, v, t, types.intp)
               for v, t in zip(cgutils.unpack_tuple(builder, index, len(index_type)), index_type)]
        return idx, arrays.shape(i, len(idx))

    @intrinsic
    def dot(typingctx, x, xi, y, yi):
        if not (ok(x, y) and len(xi) == x.ndim - 1 and len(yi) == y.ndim - 1):
            return None

        def codegen(context, builder, signature, args):
            arrays = Arrays(context, builder, signature, args, 0, (0, 2))
            xidx, n = row_pointer(context, builder, arrays, 0, signature.args[1], args[1])
            yidx, _ = row_pointer(context, builder, arrays, 1, signature.args[3], args[3])
            (acc,) = accumulators(builder, 1)
            with cgutils.for_range(builder, builder.udiv(n, ir.Constant(n.type, LANES))) as loop:
                j = builder.mul(loop.index, ir.Constant(n.type, LANES))
                fma_into(builder, acc, arrays.load(0, xidx + [j], V16F), arrays.load(1, yidx + [j], V16F))
            return hsum(builder, builder.load(acc))
        return types.float32(x, xi, y, yi), codegen

    @intrinsic
    def axpy(typingctx, o, oi, v, vi, p):
        if not (ok(o, v) and p == types.float32 and len(oi) == o.ndim - 1 and len(vi) == v.ndim - 1):
            return None

        def codegen(context, builder, signature, args):
            arrays = Arrays(context, builder, signature, args, 0, (0, 2))
            oidx, n = row_pointer(context, builder, arrays, 0, signature.args[1], args[1])
            vidx, _ = row_pointer(context, builder, arrays, 1, signature.args[3], args[3])
            pv = splat(builder, args[4])
            with cgutils.for_range(builder, builder.udiv(n, ir.Constant(n.type, LANES))) as loop:
                j = builder.mul(loop.index, ir.Constant(n.type, LANES))
                ptr = builder.bitcast(arrays.at(0, oidx + [j]), V16F.as_pointer())
                product = builder.fmul(pv, arrays.load(1, vidx + [j], V16F), flags=["contract"])
                builder.store(builder.fadd(builder.load(ptr, align=4), product, flags=["contract"]), ptr, align=4)
            return context.get_dummy_value()
        return types.none(o, oi, v, vi, p), codegen

    @intrinsic
    def finite(typingctx, x, xi):
        if not (ok(x) and len(xi) == x.ndim - 1):
            return None

        def codegen(context, builder, signature, args):
            # x - x is 0 for a finite x and nan for inf or nan; the lanes' sum of them is nan exactly when
            # one is (no fast-math flags here: the generated kernels' `contract` and `afn` keep it so)
            arrays = Arrays(context, builder, signature, args, 0, (0,))
            xidx, n = row_pointer(context, builder, arrays, 0, signature.args[1], args[1])
            (acc,) = accumulators(builder, 1)
            with cgutils.for_range(builder, builder.udiv(n, ir.Constant(n.type, LANES))) as loop:
                x = arrays.load(0, xidx + [builder.mul(loop.index, ir.Constant(n.type, LANES))], V16F)
                builder.store(builder.fadd(builder.load(acc), builder.fsub(x, x)), acc)
            total = hsum(builder, builder.load(acc))
            return builder.fcmp_ordered("==", total, total)
        return types.boolean(x, xi), codegen
    return dot, axpy, finite
