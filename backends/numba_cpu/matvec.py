"""The matrix-vector loop every weight format shares: c[M, N] = a[M, K] @ w[N, K]^T for a few rows M (decode).

Decode streams every weight once per token, so the loop's one job is to read the weights at the memory's
bandwidth. Rows of each weight matrix are split across threads a group at a time (numba gives each thread
one contiguous range of groups); a group's dot products share the loads of the activations (`dot`); fewer
rows at the end of a matrix (four at a time, then one). The rows of a group are the kernel's
`matvec_group` tile (`passes.tile`: 16 for int8 weights on AVX-512, else 8), passed by the generated code
as the last argument, a constant: each size is its own compiled loop (`literally`). `run2` and `run3` run the rows of two or three
matrices that read the same activations (W1 and W3; Q, K and V) in one parallel loop: one fork and join
instead of one each, which costs most when a neighbour holds a core.

What a format contributes is its operands and its dot products, chosen when a call is compiled from the
operands' types:

- fp32: weights W = (w,) float32 [N, K], activations X = (a,);
- bf16: W = (pairs,), the bits w[N, K] read two at a time as uint32 [N, K/2] (`lowp.py`), X = (a,);
- int8: W = (q, s), int8 blocks and their scales, X = (xq, xs), the activations quantized once per call
  (`int8.py`).

The dot products are written in LLVM IR (`simd.float_dot`, `int8_dot`): they prefetch the next group's
rows, which one core otherwise reads below the memory's bandwidth (short streams the hardware prefetcher
does not ramp up on). fp32 weights against one activation row (decode, batch 1) are read two rows at a
time instead, one pair after another, so the thread's weights are one long stream; fp32 and bf16 weights
against several activation rows in register blocks of two weight rows by four activation rows
(`rows_one_stream`, `matvec_blocked`, measured there).
"""
from __future__ import annotations

import numpy as np
from numba import literally, njit, prange, types
from numba.core import errors
from numba.extending import overload

from fusec.backends.numba_cpu.blas import _bits_as_f32, row_groups, wide_vectors
from fusec.backends.numba_cpu.matvec_blocked import blocked_rows
from fusec.backends.numba_cpu.matvec_plain import FASTMATH, plain, streams
from fusec.backends.numba_cpu.simd import LANES, WIDENED

_HI = np.uint32(0xFFFF0000)
_SHIFT = np.uint32(16)

def _format(w: types.Type) -> str:
    """The weight format of a call's weight operands W (see the module docstring)."""
    if isinstance(w, types.BaseTuple) and len(w) == 2:
        return "int8"
    return "bf16" if w[0].dtype == types.uint32 else "fp32"


_DOTS: dict = {}


def _dots(fmt: str, count: int):
    """The intrinsic summing `count` rows of weights of format `fmt` (made once per format and count): bf16
    and int8 weight rows here, fp32 key rows in the decode attention (`attention_block._scores_rows`)."""
    if (fmt, count) not in _DOTS:
        if fmt == "int8":
            from fusec.backends.numba_cpu.int8_dot import dot_rows
            _DOTS[fmt, count] = dot_rows(count)
        else:
            from fusec.backends.numba_cpu.simd import float_dot
            _DOTS[fmt, count] = float_dot(count, pairs=fmt == "bf16")
    return _DOTS[fmt, count]


def dot(w, x, n0, m, count):
    """The tuple of `count` dot products of activation row m with weight rows n0.. (njit code only)."""
    raise NotImplementedError("matvec.dot runs inside njit code only")


@overload(dot, inline="always", prefer_literal=True)
def _dot(w, x, n0, m, count):
    fn = _dots(_format(w), count.literal_value)
    if _format(w) == "int8":
        return lambda w, x, n0, m, count: fn(w[0], w[1], x[0], x[1], n0, m)
    return lambda w, x, n0, m, count: fn(w[0], x[0], n0, m)


def rest(w, x, m, n):
    """What `dot` leaves of row n's dot product with activation row m: the last K % 16 columns of an fp32
    row, the last pairs (K/2 % 16) of a bf16 row; nothing of an int8 row (its dot takes every block)."""
    raise NotImplementedError("matvec.rest runs inside njit code only")


@overload(rest)
def _rest(w, x, m, n):
    fmt = _format(w)
    if fmt == "int8":
        return lambda w, x, m, n: np.float32(0.0)
    if fmt == "bf16":
        def pairs_rest(w, x, m, n):
            pairs, a = w[0], x[0]
            s = np.float32(0.0)
            for j in range(pairs.shape[1] - pairs.shape[1] % LANES, pairs.shape[1]):
                b = pairs[n, j]
                s += a[m, 2 * j] * _bits_as_f32(b << _SHIFT) + a[m, 2 * j + 1] * _bits_as_f32(b & _HI)
            return s
        return pairs_rest

    def floats_rest(w, x, m, n):
        v, a = w[0], x[0]
        s = np.float32(0.0)
        for k in range(v.shape[1] - v.shape[1] % LANES, v.shape[1]):
            s += a[m, k] * v[n, k]
        return s
    return floats_rest


@njit(inline="always")
def _row_dot(v, a, n, m):
    """v[n] . a[m], one running sum that the kernel's `reassoc` lets LLVM split into vector lanes."""
    s = np.float32(0.0)
    for k in range(v.shape[1]):
        s += a[m, k] * v[n, k]
    return s


@njit(inline="always")
def _two_rows_dot(v, a, n):
    """(v[n] . a[0], v[n + 1] . a[0]) in one loop: two rows summed side by side read 6-12% more bytes per
    second than one after the other, near a plain sum's rate (an Intel Xeon, 2 threads, huge pages,
    768 x 768 to 32000 x 768; four rows: 2-4%)."""
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    for k in range(v.shape[1]):
        s0 += a[0, k] * v[n, k]
        s1 += a[0, k] * v[n + 1, k]
    return s0, s1


def rows_one_stream(w, x, c, n0, rows):
    """c[:, n0:n0+rows] = the activation rows times weight rows n0.. where the weights' format has a loop
    of its own for them: True then, else False (nothing done; `rows_into` takes a group's rows side by
    side in `dot`). fp32 weights against one activation row (decode, batch 1): two weight rows at a time,
    a pair after another, each pair's dot products LLVM's own vector loop (`_two_rows_dot`); fp32 and bf16
    weights against several activation rows: register blocks of two weight rows by four activation rows
    (`matvec_blocked`). njit code only."""
    raise NotImplementedError("matvec.rows_one_stream runs inside njit code only")


@overload(rows_one_stream, inline="always")
def _rows_one_stream(w, x, c, n0, rows):
    fmt = _format(w)
    if fmt == "int8":
        return lambda w, x, c, n0, rows: False
    if fmt == "bf16":
        return lambda w, x, c, n0, rows: x[0].shape[0] != 1 and blocked_rows(w, x, c, n0, rows)

    def one_stream(w, x, c, n0, rows):
        if x[0].shape[0] != 1:
            return blocked_rows(w, x, c, n0, rows)
        for r in range(0, rows - 1, 2):
            c[0, n0 + r], c[0, n0 + r + 1] = _two_rows_dot(w[0], x[0], n0 + r)
        if rows % 2:
            c[0, n0 + rows - 1] = _row_dot(w[0], x[0], n0 + rows - 1, 0)
        return True
    return one_stream


@njit(inline="always")
def rows_into(w, x, c, n0, group):
    """c[:, n0:n0+group] = the activation rows times weight rows n0..n0+group-1 (`group` a literal; fewer at
    the end: four at a time, then one).

    fp32 weights against one activation row (decode, batch 1) are read a row (now a pair) after another
    (`rows_one_stream`): the thread's weights are then one stream from memory, which the hardware prefetcher
    follows, where a group's rows side by side are `group` short streams. Measured on the AMD CPU with
    AVX-512 (2 threads, weights cycled over 256 MB, 20-30 rounds alternating, medians): 1.24-1.3x the bytes
    per second of the 8-row groups at stories15M's 32000 x 288 head (31.7 against 24.9 GB/s), 32000 x 768
    and 768 x 288, 0.95-1.03x at 2048 x 768 and 768 x 2048. Several activation rows against fp32 or bf16
    weights take register blocks (`matvec_blocked`: a row after row loop took 1.3-1.7x the time of a
    group's rows side by side there, the blocks 0.6-0.9x). The rest, a group's rows side by side (`dot`),
    one activation row after another: int8 weights, and bf16 ones against one activation row."""
    rows = min(group, w[0].shape[0] - n0)
    if rows_one_stream(w, x, c, n0, rows):
        return
    for m in range(x[0].shape[0]):
        if rows == group:
            d = dot(w, x, n0, m, group)
            for r in range(group):
                c[m, n0 + r] = d[r] + rest(w, x, m, n0 + r)
        else:
            done = 0
            while rows - done >= 4:
                d4 = dot(w, x, n0 + done, m, 4)
                for r in range(4):
                    c[m, n0 + done + r] = d4[r] + rest(w, x, m, n0 + done + r)
                done += 4
            for r in range(done, rows):
                c[m, n0 + r] = dot(w, x, n0 + r, m, 1)[0] + rest(w, x, m, n0 + r)


def vectors_for(w):
    """Ask LLVM for 512-bit vectors (`blas.wide_vectors`) in the loop's body, for bf16 and int8 weights
    (their widening takes half the shuffles per weight); not for fp32: its row after row stream
    (`rows_one_stream`, LLVM's own vector loop) read 12-15% fewer bytes per second with 512-bit vectors
    (an Intel Xeon, 768 x 768 to 32000 x 768, 2 threads, weights on huge pages cycled over 512 MB). njit
    code only."""
    raise NotImplementedError("matvec.vectors_for runs inside njit code only")


@overload(vectors_for, inline="always")
def _vectors_for(w):
    if _format(w) == "fp32":
        return lambda w: None
    return lambda w: wide_vectors()


# The parallel loops, inlined into each format's kernels (`matvec.matvec`, `lowp.matvec2_bf16`, ...): their
# prange becomes the kernel's own. `vectors_for` sits in the loop's body, which is a function of its own.
@njit(inline="always")
def run1(group, x, w0, c0):
    for g in prange(row_groups(w0[0], group)):
        vectors_for(w0)
        rows_into(w0, x, c0, group * g, group)


@njit(inline="always")
def run2(group, x, w0, w1, c0, c1):
    g0 = row_groups(w0[0], group)
    for g in prange(g0 + row_groups(w1[0], group)):
        vectors_for(w0)
        rows_of(g, (g0,), group, x, (w0, w1), (c0, c1))


@njit(inline="always")
def run3(group, x, w0, w1, w2, c0, c1, c2):
    g0 = row_groups(w0[0], group)
    g1 = g0 + row_groups(w1[0], group)
    for g in prange(g1 + row_groups(w2[0], group)):
        vectors_for(w0)
        rows_of(g, (g0, g1), group, x, (w0, w1, w2), (c0, c1, c2))


def rows_of(g, starts, group, x, ws, cs):
    """`rows_into` for row group g of the matrices `ws` (outputs `cs`) taken in turn, whose groups start at
    0 and `starts` (njit code only)."""
    raise NotImplementedError("matvec.rows_of runs inside njit code only")


@overload(rows_of, inline="always", prefer_literal=True)
def _rows_of(g, starts, group, x, ws, cs):
    if isinstance(ws, types.UniTuple) and isinstance(cs, types.UniTuple):
        # matrices of one type (the usual case): one copy of the row loop, the matrix picked by index;
        # each copy is code that every kernel calling the loop links and LLVM optimizes again
        def same(g, starts, group, x, ws, cs):
            k, first = 0, 0
            for s in starts:
                if g >= s:
                    k, first = k + 1, s
            rows_into(ws[k], x, cs[k], group * (g - first), group)
        return same
    if len(ws) == 2:
        def two(g, starts, group, x, ws, cs):
            if g < starts[0]:
                rows_into(ws[0], x, cs[0], group * g, group)
            else:
                rows_into(ws[1], x, cs[1], group * (g - starts[0]), group)
        return two

    def three(g, starts, group, x, ws, cs):
        if g < starts[0]:
            rows_into(ws[0], x, cs[0], group * g, group)
        elif g < starts[1]:
            rows_into(ws[1], x, cs[1], group * (g - starts[0]), group)
        else:
            rows_into(ws[2], x, cs[2], group * (g - starts[1]), group)
    return three


_WIDENED = np.array(WIDENED, np.intp)


@njit(inline="always")
def widened(a):
    """A copy of the activations a[M, K] (float32, C-contiguous) with each whole chunk of 32 columns in the
    order `simd.float_dot` widens bf16 pairs to (`simd.WIDENED`); the other columns as they are (`rest`
    reads those). Once per call: permuting each chunk of activations in the loop cost two shuffles per
    chunk and group of rows, a seventeenth of a bf16 group's vector work (about 1% of a group's time
    on one thread; the shuffles compete for the port that the widening uses)."""
    out = np.empty_like(a)
    chunk = 2 * LANES
    whole = a.shape[1] - a.shape[1] % chunk
    for m in range(a.shape[0]):
        for j in range(0, whole, chunk):
            for t in range(chunk):
                out[m, j + t] = a[m, j + _WIDENED[t]]
        for k in range(whole, a.shape[1]):
            out[m, k] = a[m, k]
    return out


def activations(a, ws):
    """The activations as the loop reads them with the weights `ws` (a tuple of one format): (a,), or for
    bf16 bits (widened(a),). njit code only."""
    raise NotImplementedError("matvec.activations runs inside njit code only")


@overload(activations)
def _activations(a, ws):
    bf16 = {w.dtype == types.uint16 for w in ws}
    if len(bf16) > 1:
        raise errors.TypingError("matvec2/matvec3: the weights must be of one format, all float32 or all bf16 "
                                 f"bits (uint16); got {', '.join(str(w.dtype) for w in ws)}")
    if bf16 == {True}:
        return lambda a, ws: (widened(a),)
    return lambda a, ws: (a,)


def operands(w):
    """A weight matrix as the loop reads it: (w,) for float32, the bf16 bits w[N, K] as pairs (uint32
    [N, K/2]: the even element in the low half, the odd one in the high half)."""
    raise NotImplementedError("matvec.operands runs inside njit code only")


@overload(operands)
def _operands(w):
    if w.dtype == types.uint16:
        return lambda w: (w.view(np.uint32),)
    return lambda w: (w,)


# c[M, N] = a[M, K] @ w[N, K]^T with float32 weights or bfloat16 ones (their uint16 bits: `lowp.matvec_bf16`
# is this function), weight rows `group` at a time (a constant: the kernel's `matvec_group` tile);
# `matvec2` and `matvec3` run two or three matrices that read the same activations in one parallel loop
# (`run2`, `run3`).
@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec(a, w, c, group):
    literally(group)
    if streams(a, w):
        run1(group, activations(a, (w,)), operands(w), c)
    else:
        plain(a, w, c, (w,))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec2(a, w0, w1, c0, c1, group):
    literally(group)
    if streams(a, w0) and streams(a, w1):
        run2(group, activations(a, (w0, w1)), operands(w0), operands(w1), c0, c1)
    else:
        plain(a, w0, c0, (w0, w1))
        plain(a, w1, c1, (w0, w1))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec3(a, w0, w1, w2, c0, c1, c2, group):
    literally(group)
    if streams(a, w0) and streams(a, w1) and streams(a, w2):
        run3(group, activations(a, (w0, w1, w2)), operands(w0), operands(w1), operands(w2), c0, c1, c2)
    else:
        plain(a, w0, c0, (w0, w1, w2))
        plain(a, w1, c1, (w0, w1, w2))
        plain(a, w2, c2, (w0, w1, w2))


def with_group(kernel, group: int, arity: int):
    """`kernel` (of `arity` arguments before the group) as Python calls it: compiled with the constant
    `group`. The group must be a literal (`literally`): a group passed from Python types the kernel anew
    on every call (about 10 ms); generated kernels pass a constant, as this does."""
    names = ", ".join(f"x{i}" for i in range(arity))
    scope = {"kernel": kernel}
    exec(f"def call({names}):\n    return kernel({names}, {int(group)})", scope)
    return njit(scope["call"])
