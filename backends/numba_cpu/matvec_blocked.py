"""fp32 weights against a few activation rows (a short prompt's prefill, a batch's decode step): register
blocks of two weight rows by four activation rows.

Each pass over K loads two weight rows and four activation rows once and keeps their eight sums in
vector registers (`simd.float_dot` with `acts=4`, written in LLVM IR), so a weight row is read from
memory once per four activation rows and from the cache after that, and each load of either side serves
several products. The loop it replaced (`matvec.dot`'s groups: eight weight rows side by side, one
activation row at a time) read the group's weights again for every activation row. The same blocks as a
Numba loop (LLVM's vectorizer over eight `reassoc` sums) ran a little slower and tripled the compile time
of the library's `matvec3`. Measured side by side with the group loop (2026-12-03, an Intel Xeon, 2
threads, weights on huge pages cycled over 600 MB, medians of 3 rounds): 5632 x 2048 at 2 / 4 / 5 / 8 /
16 / 18 rows 28.8 / 29.4 / 25.1 / 22.7 / 12.6 / 14.1 against 26.2 / 20.2 / 18.2 / 14.5 / 9.0 / 8.4 GB/s;
768 x 768 31.5 / 31.4 / 28.8 / 25.1 / 14.3 / 12.5 against 26.4 / 23.0 / 21.6 / 17.4 / 12.0 / 11.2; one
row (`matvec.rows_into`'s own loop) 31-33 GB/s either way. `benchmarks/bench_matvec.py --rows M`
measures it. bf16 and int8 weights still take the groups at several rows.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from fusec.backends.numba_cpu.simd import LANES, float_dot

_TWO_BY_FOUR = float_dot(2, pairs=False, acts=4)  # two weight rows by four activation rows: 8 sums
_TWO_BY_ONE = float_dot(2, pairs=False)
_ONE_BY_ONE = float_dot(1, pairs=False)


@njit(inline="always")
def _tail(v, a, n, m):
    """v[n] . a[m] over the columns past the last whole chunk of 16 (what `float_dot` leaves)."""
    s = np.float32(0.0)
    for k in range(v.shape[1] - v.shape[1] % LANES, v.shape[1]):
        s += a[m, k] * v[n, k]
    return s


@njit(inline="always")
def blocked_rows(v, a, c, n0, rows):
    """c[:, n0:n0+rows] = a @ v[n0:n0+rows]^T for fp32 weights v [N, K] and activations a [M, K] (both
    C-contiguous): pairs of weight rows against blocks of four activation rows, then the activation rows
    left one at a time, then an odd last weight row. njit code only."""
    m_rows = a.shape[0]
    whole = m_rows - m_rows % 4
    tail = v.shape[1] % LANES != 0
    for r in range(0, rows - 1, 2):
        n = n0 + r
        for m in range(0, whole, 4):
            s = _TWO_BY_FOUR(v, a, n, m)
            c[m, n], c[m + 1, n], c[m + 2, n], c[m + 3, n] = s[0], s[1], s[2], s[3]
            c[m, n + 1], c[m + 1, n + 1], c[m + 2, n + 1], c[m + 3, n + 1] = s[4], s[5], s[6], s[7]
        for m in range(whole, m_rows):
            c[m, n], c[m, n + 1] = _TWO_BY_ONE(v, a, n, m)
        if tail:
            for m in range(m_rows):
                c[m, n] += _tail(v, a, n, m)
                c[m, n + 1] += _tail(v, a, n + 1, m)
    if rows % 2:
        n = n0 + rows - 1
        for m in range(m_rows):
            c[m, n] = _ONE_BY_ONE(v, a, n, m)[0] + _tail(v, a, n, m)
