"""fp32 and bf16 weights against a few activation rows (a short prompt's prefill, a batch's decode step):
register blocks of two weight rows by four activation rows.

Each pass over K loads two weight rows (bf16 ones widened once) and four activation rows once and keeps
their eight sums in vector registers (`simd.float_dot` with `acts=4`, written in LLVM IR), so a weight
row is read from memory once per four activation rows and from the cache after that, and each load of
either side serves several products. The loop it replaced (`matvec.dot`'s groups: eight weight rows side
by side, one activation row at a time) read the group's weights again, and widened bf16 ones again, for
every activation row. The same blocks as a Numba loop (LLVM's vectorizer over eight `reassoc` sums) ran
a little slower and tripled the compile time of the library's `matvec3`. Measured side by side with the
group loop, fp32 (2026-12-03, an Intel Xeon, 2 threads, weights on huge pages cycled over 600 MB,
medians of 3 rounds): 5632 x 2048 at 2 / 4 / 5 / 8 / 16 / 18 rows 28.8 / 29.4 / 25.1 / 22.7 / 12.6 /
14.1 against 26.2 / 20.2 / 18.2 / 14.5 / 9.0 / 8.4 GB/s; 768 x 768 31.5 / 31.4 / 28.8 / 25.1 / 14.3 /
12.5 against 26.4 / 23.0 / 21.6 / 17.4 / 12.0 / 11.2; one row (`matvec.rows_one_stream`'s loop) 31-33
GB/s either way. bf16, tinyllama_1b's prefill of 4 / 8 / 32 tokens (whole programs, alternating runs):
86 / 129-133 / 324-379 ms against 105-108 / 152-158 / 440-455 ms. `benchmarks/bench_matvec.py --rows M`
measures the kernels. The cost: the library's fp32 `matvec3` compiles in 6.5 s against 3.5 s (once per
machine; the blocks and the groups are both in it). int8 weights still take the groups at several rows
(their products need the activations quantized per block: `int8_dot`).
"""
from __future__ import annotations

from numba import njit, types
from numba.core import errors
from numba.extending import overload

from fusec.backends.numba_cpu.simd import LANES, float_dot

_DOTS: dict = {}


def dots(w, x, n, m, count, acts):
    """The `count * acts` dot products of weight rows n.. with activation rows m.. over the columns that
    fill whole chunks (`simd.float_dot`; row r's with activation row m + i at r * acts + i), for weights
    w = (float32 [N, K],) or bf16 bits as pairs (uint32 [N, K/2],) and activations x = (a,) in the order
    the weights need (`matvec.activations`). njit code only."""
    raise NotImplementedError("matvec_blocked.dots runs inside njit code only")


@overload(dots, inline="always", prefer_literal=True)
def _dots(w, x, n, m, count, acts):
    if not (isinstance(count, types.IntegerLiteral) and isinstance(acts, types.IntegerLiteral)):
        raise errors.TypingError("matvec_blocked.dots: count and acts must be constants")
    key = (w[0].dtype == types.uint32, count.literal_value, acts.literal_value)
    if key not in _DOTS:
        _DOTS[key] = float_dot(key[1], pairs=key[0], acts=key[2])
    fn = _DOTS[key]
    return lambda w, x, n, m, count, acts: fn(w[0], x[0], n, m)


@njit(inline="always")
def blocked_rows(w, x, c, n0, rows):
    """c[:, n0:n0+rows] = the activation rows times weight rows n0.. (`dots`' operands): pairs of weight
    rows against blocks of four activation rows, then the activation rows left one at a time, then an
    odd last weight row; True. False (nothing done) when the rows are not whole chunks of 16 weights
    (fp32 K, or bf16 K/2, a multiple of 16: every model's here), which `matvec.rest` completes in the
    group loop: a tail loop per block cost the library's compile more than it would ever save. njit only."""
    if w[0].shape[1] % LANES != 0:
        return False
    m_rows = x[0].shape[0]
    whole = m_rows - m_rows % 4
    for r in range(0, rows - 1, 2):
        n = n0 + r
        for m in range(0, whole, 4):
            s = dots(w, x, n, m, 2, 4)
            c[m, n], c[m + 1, n], c[m + 2, n], c[m + 3, n] = s[0], s[1], s[2], s[3]
            c[m, n + 1], c[m + 1, n + 1], c[m + 2, n + 1], c[m + 3, n + 1] = s[4], s[5], s[6], s[7]
        for m in range(whole, m_rows):
            c[m, n], c[m, n + 1] = dots(w, x, n, m, 2, 1)
    if rows % 2:
        n = n0 + rows - 1
        for m in range(m_rows):
            c[m, n] = dots(w, x, n, m, 1, 1)[0]
    return True
