"""The int8 matrix-vector loop's inner parts in LLVM IR (`int8.py` runs them): the activations' quantization
(`quantize_block`) and the dot products of int8 weight rows with them (`dot_rows(count)`, one intrinsic per
row count: the loop's group, four, one); and a block widened back to float32 (`widen_block`, for the
prefill GEMMs).

LLVM does not form the integer dot-product instructions from Numba's code (Numba widens integer products to
64 bits), nor vectorize the quantization (Numba's `np.rint` is a call), so both are written here. The
products take the best form the CPU has (`KIND`): VNNI's `vpdpbusd` (four byte products summed per int32
lane: one instruction per 64 weight bytes of a row), `pmaddwd` (AVX-512 or AVX2: widen to int16, pair
sums, then neighbouring pairs added), else portable IR. Integer sums are exact, so all forms give the same
int32 lanes and the same float32 results (tests/test_int8_dot.py compares them).
"""
from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import config, types
from numba.core import cgutils
from numba.extending import intrinsic

from fusec.backends.numba_cpu.simd import (F32, I8, I16, I32, V16F, V16I, Arrays, accumulators, fma_into, hsums,
                                           intp_args, at_byte, lanes, prefetch, PREFETCH)

BLOCK = 32  # int8 values per scale (`passes.weights.BLOCK`)


def _target_features() -> set[str]:
    """The CPU features Numba compiles for: the host's, or those NUMBA_CPU_FEATURES names when
    NUMBA_CPU_NAME picks another CPU (then no x86 intrinsic unless named)."""
    if config.CPU_NAME:
        return {f[1:] for f in (config.CPU_FEATURES or "").split(",") if f.startswith("+")}
    return {name for name, on in llvm.get_host_cpu_features().items() if on}


def _dot_kind() -> str:
    """The integer products' form: the fastest the target CPU has (see the module docstring)."""
    features = _target_features()
    if {"avx512vnni", "avx512bw"} <= features:
        return "vnni"
    if "avx512bw" in features:
        return "avx512"
    return "avx2" if "avx2" in features else "portable"


KIND = _dot_kind()  # read when a kernel is compiled (tests set it to compile the other forms)
V64B, V32B = ir.VectorType(I8, 64), ir.VectorType(I8, 32)


def _pairs(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """<16 x i32>: a[2j] * b[2j] + a[2j+1] * b[2j+1] of <32 x i16> vectors a and b."""
    module = builder.module
    if KIND == "avx512":
        fn = cgutils.get_or_insert_function(module, ir.FunctionType(V16I, [a.type, b.type]),
                                            "llvm.x86.avx512.pmaddw.d.512")
        return builder.call(fn, [a, b])
    fn = cgutils.get_or_insert_function(
        module, ir.FunctionType(ir.VectorType(I32, 8), [ir.VectorType(I16, 16)] * 2), "llvm.x86.avx2.pmadd.wd")
    halves = [builder.call(fn, [lanes(builder, a, h, 16), lanes(builder, b, h, 16)]) for h in (0, 16)]
    return builder.shuffle_vector(halves[0], halves[1], ir.Constant(V16I, list(range(16))))


def _vpdpbusd(builder: ir.IRBuilder, acc: ir.Value, u: ir.Value, s: ir.Value) -> ir.Value:
    """acc + (the sums of four products of unsigned bytes u and signed bytes s, per int32 lane)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16I, [V16I] * 3),
                                        "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, builder.bitcast(u, V16I), builder.bitcast(s, V16I)])


def _activation_chunk(builder: ir.IRBuilder, x: ir.Value):
    """What every weight row's `_quads` needs of 64 activation bytes x (<64 x i8>), made once per chunk."""
    if KIND == "vnni":  # -128 * (the sum of each lane's four activations): see `_quads`
        high = ir.Constant(V64B, [0x80] * 64)
        return x, builder.sub(ir.Constant(V16I, [0] * 16), _vpdpbusd(builder, ir.Constant(V16I, [0] * 16), high, x))
    if KIND == "portable":
        return builder.sext(x, ir.VectorType(I32, 64))
    return builder.sext(x, ir.VectorType(I16, 64))


def _quads(builder: ir.IRBuilder, w: ir.Value, prepared) -> ir.Value:
    """<16 x i32>: lane l = sum of w[i] * x[i] over i = 4l .. 4l + 3, for 64 weight bytes w (two blocks:
    lanes 0-7 the first, 8-15 the second) and the activations x that `_activation_chunk` prepared. Exact
    in int32 in every form, so all forms give the same lanes. With VNNI: vpdpbusd multiplies unsigned by
    signed bytes, so the weights go in as w + 128 (unsigned: w xor 0x80, exact for every int8) and the
    accumulator starts at -128 * (sum of the lane's x), shared by all rows."""
    if KIND == "vnni":
        x, start = prepared
        return _vpdpbusd(builder, start, builder.xor(w, ir.Constant(V64B, [0x80] * 64)), x)
    if KIND == "portable":
        products = builder.mul(builder.sext(w, ir.VectorType(I32, 64)), prepared)
    else:
        wide = builder.sext(w, ir.VectorType(I16, 64))
        halves = [_pairs(builder, lanes(builder, wide, h, 32), lanes(builder, prepared, h, 32)) for h in (0, 32)]
        products = builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(I32, 32), list(range(32))))
    while products.type.count > 16:  # add neighbouring lanes until each holds its four products
        half = products.type.count // 2
        products = builder.add(lanes(builder, products, 0, half, 2), lanes(builder, products, 1, half, 2))
    return products


def _dot_rows(count: int):
    """An intrinsic dot(q, s, xq, xs, n0, m): the tuple of `count` float32 dot products of activation row m
    (int8 xq[M, B, 32], scales xs[M, B]) with weight rows n0.. of q[N, B, 32] (int8) and s[N, B, 1]. Two
    blocks (64 bytes, one vector) at a time: per row one `_quads`, a conversion and one FMA by the two
    blocks' scales s * xs (8 lanes each) into the row's 16 float32 lanes, reduced once at the end; an odd
    last block alone, zero-padded. q, s and xq must be C-contiguous (callers make sure)."""
    @intrinsic
    def dot(typingctx, q, s, xq, xs, n0, m):
        arrays = (q, s, xq, xs)
        want = ((types.int8, 3), (types.float32, 3), (types.int8, 3), (types.float32, 2))
        if not all(isinstance(t, types.Array) and (t.dtype, t.ndim) == w for t, w in zip(arrays, want)):
            return None
        if not (isinstance(n0, types.Integer) and isinstance(m, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            arrays = Arrays(context, builder, signature, args, 4)  # q, s, xq, xs
            n0v, mv = intp_args(context, builder, signature, args, 4)
            intp = n0v.type
            zero = ir.Constant(intp, 0)
            blocks = arrays.shape(0, 1)
            rows = [builder.add(n0v, ir.Constant(intp, r)) for r in range(count)]
            qrows = [arrays.at(0, [n, zero, zero]) for n in rows]
            srows = [arrays.at(1, [n, zero, zero]) for n in rows]
            xrow, xsrow = arrays.at(2, [mv, zero, zero]), arrays.at(3, [mv, zero])
            accs = accumulators(builder, count)
            v2f = ir.VectorType(F32, 2)
            spread = ir.Constant(V16I, [0] * 8 + [1] * 8)

            def step(index, width):  # blocks 2 index .. (+1 when width is 2): one 64-byte chunk
                nbytes = ir.Constant(intp, 2 * BLOCK) if width == 2 else ir.Constant(intp, BLOCK)
                at = builder.mul(index, ir.Constant(intp, 2 * BLOCK))
                four = builder.mul(index, ir.Constant(intp, 8))  # bytes of 2 float32 scales

                def chunk(base):
                    if width == 2:
                        return builder.load(at_byte(builder, base, at, V64B), align=1)
                    half = builder.load(at_byte(builder, base, at, V32B), align=1)
                    return builder.shuffle_vector(half, ir.Constant(V32B, [0] * 32),
                                                  ir.Constant(ir.VectorType(I32, 64), list(range(64))))

                def scales(base):
                    if width == 2:
                        return builder.load(at_byte(builder, base, four, v2f), align=4)
                    return builder.insert_element(ir.Constant(v2f, [0.0, 0.0]),
                                                  builder.load(at_byte(builder, base, four, F32)), ir.Constant(I32, 0))
                if width == 2:
                    # the same blocks some groups ahead (`simd.PREFETCH`), and their scales
                    for rows_ahead, offset, row_bytes, plan in ((qrows, at, BLOCK, PREFETCH["int8"]),
                                                                (srows, four, 4, PREFETCH["int8_scales"])):
                        for groups, into_l1 in plan:
                            step_bytes = ir.Constant(intp, row_bytes * count * groups)
                            ahead = builder.add(offset, builder.mul(blocks, step_bytes))
                            for row in rows_ahead:
                                prefetch(builder, at_byte(builder, row, ahead, I8), into_l1=into_l1)
                prepared = _activation_chunk(builder, chunk(xrow))
                xsv = scales(xsrow)
                for acc, qrow, srow in zip(accs, qrows, srows):
                    dots = builder.sitofp(_quads(builder, chunk(qrow), prepared), V16F)
                    scale = builder.shuffle_vector(builder.fmul(scales(srow), xsv), ir.Constant(v2f, ir.Undefined),
                                                   spread)
                    fma_into(builder, acc, dots, scale)
            pairs = builder.udiv(blocks, ir.Constant(intp, 2))
            with cgutils.for_range(builder, pairs) as loop:
                step(loop.index, 2)
            odd = builder.icmp_unsigned("!=", builder.urem(blocks, ir.Constant(intp, 2)), zero)
            with builder.if_then(odd):
                step(pairs, 1)
            sums = hsums(builder, [builder.load(a) for a in accs])
            return context.make_tuple(builder, signature.return_type, sums)
        return types.UniTuple(types.float32, count)(q, s, xq, xs, n0, m), codegen
    return dot


_DOT_ROWS: dict = {}


def dot_rows(count: int):
    """The intrinsic of `count` rows (`_dot_rows`), made once per count."""
    if count not in _DOT_ROWS:
        _DOT_ROWS[count] = _dot_rows(count)
    return _DOT_ROWS[count]


@intrinsic
def quantize_block(typingctx, a, xq, xs, m, b):
    """Block b of activation row m, a[m, 32b : 32b + 32] (float32, C-contiguous), as int8 xq[m, b] and
    scale xs[m, b] (`int8.quantize_rows` says what they are). Vectorized: the largest |a| is the largest
    of the values' bits with the sign cleared (NaN's bits lie above inf's, so one comparison also finds a
    non-finite value); the rounding is LLVM's roundeven (ties to even, as np.rint)."""
    want = ((types.float32, 2), (types.int8, 3), (types.float32, 2))
    if not all(isinstance(t, types.Array) and (t.dtype, t.ndim) == w for t, w in zip((a, xq, xs), want)):
        return None

    def codegen(context, builder, signature, args):
        arrays = Arrays(context, builder, signature, args, 3)
        mv, bv = intp_args(context, builder, signature, args, 3)
        zero = ir.Constant(mv.type, 0)
        v32f, v32i = ir.VectorType(F32, BLOCK), ir.VectorType(I32, BLOCK)
        x = arrays.load(0, [mv, builder.mul(bv, ir.Constant(mv.type, BLOCK))], v32f)
        magnitude = builder.and_(builder.bitcast(x, v32i), ir.Constant(v32i, [0x7FFFFFFF] * BLOCK))
        umax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(I32, [v32i]),
                                              "llvm.vector.reduce.umax.v32i32")
        top = builder.call(umax, [magnitude])
        amax = builder.bitcast(top, F32)
        finite = builder.icmp_unsigned("<", top, ir.Constant(I32, 0x7F800000))
        inv = builder.fdiv(ir.Constant(F32, 127.0), amax)
        # a zero block, or one so small that 127 / amax overflows, quantizes to 0 (as the reference)
        usable = builder.and_(finite, builder.fcmp_ordered("<", inv, ir.Constant(F32, float("inf"))))
        scaled = builder.fmul(x, builder.shuffle_vector(
            builder.insert_element(ir.Constant(v32f, ir.Undefined), inv, ir.Constant(I32, 0)),
            ir.Constant(v32f, ir.Undefined), ir.Constant(v32i, [0] * BLOCK)))
        rounded = builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32f, [v32f]),
                                                              "llvm.roundeven.v32f32"), [scaled])
        # clamped to +-127 before the conversion, which is undefined for inf or NaN (unused lanes of a
        # block that is not `usable` may hold them)
        bounds = [ir.Constant(v32f, [v] * BLOCK) for v in (-127.0, 127.0)]
        for name, bound in (("maxnum", bounds[0]), ("minnum", bounds[1])):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32f, [v32f, v32f]),
                                                f"llvm.{name}.v32f32")
            rounded = builder.call(fn, [rounded, bound])
        v32b = ir.VectorType(I8, BLOCK)
        q = builder.select(usable, builder.fptosi(rounded, v32b), ir.Constant(v32b, [0] * BLOCK))
        builder.store(q, builder.bitcast(arrays.at(1, [mv, bv, zero]), v32b.as_pointer()), align=1)
        scale = builder.select(finite, builder.fdiv(amax, ir.Constant(F32, 127.0)), ir.Constant(F32, float("nan")))
        builder.store(scale, arrays.at(2, [mv, bv]))
        return context.get_dummy_value()
    return types.none(a, xq, xs, m, b), codegen


@intrinsic
def widen_block(typingctx, q, n, b, scale, out, row):
    """out[row, 32b : 32b + 32] = q[n, b, :] * scale (q int8 [N, K/32, 32] with unit stride in its last
    axis): one vector load, conversion, multiply and store. Numba's loop for it stays scalar (LLVM unrolls
    the 32 steps and cannot prove the stores miss q), at a third of the bf16 widening's speed."""
    if not (isinstance(q, types.Array) and q.dtype == types.int8 and q.ndim == 3 and q.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        arrays = Arrays(context, builder, signature, args, 0, positions=(0, 4))
        nv, bv = intp_args(context, builder, signature, args[:3], 1)
        rv = intp_args(context, builder, signature, args, 5)[0]
        zero = ir.Constant(nv.type, 0)
        v32f = ir.VectorType(F32, BLOCK)
        x = builder.sitofp(arrays.load(0, [nv, bv, zero], ir.VectorType(I8, BLOCK)), v32f)
        splat = builder.shuffle_vector(builder.insert_element(ir.Constant(v32f, ir.Undefined), args[3],
                                                              ir.Constant(I32, 0)),
                                       ir.Constant(v32f, ir.Undefined), ir.Constant(ir.VectorType(I32, BLOCK), [0] * BLOCK))
        target = arrays.at(1, [rv, builder.mul(bv, ir.Constant(bv.type, BLOCK))])
        builder.store(builder.fmul(x, splat), builder.bitcast(target, v32f.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.none(q, n, b, types.float32, out, row), codegen
