"""fp32 weights against a few activation rows (a short prompt's prefill, a batch's decode step): register
blocks of two weight rows by four activation rows.

Each pass over K loads two weight rows and four activation rows once and keeps their eight sums in
vector registers (LLVM's own vector loop over the `reassoc` sums), so a weight row is read from memory
once per four activation rows and from the cache after that, and each load of either side serves
several products. The loop it replaced (`matvec.dot`: eight weight rows side by side, one activation row
at a time) read the group's weights again for every activation row. Measured (an Intel Xeon, 2 threads,
weights on huge pages cycled over 600 MB, medians): 5632 x 2048 at 4 / 5 / 8 / 16 rows 26 / 23 / 19 /
13 against 21 / 19 / 15 / 9 GB/s, 768 x 768 at 4 / 8 / 16 rows 24 / 19 / 14 against 22 / 17 / 12 GB/s;
one row is `matvec.rows_one_stream`'s, 30 GB/s either way. Blocks of four weight rows by four
activation rows (16 sums) measured within a few percent of these.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(inline="always")
def _two_by_four(v, a, n, m):
    """(v[n] . a[m..m+3], v[n+1] . a[m..m+3]): eight sums in one pass over K."""
    s00 = s01 = s02 = s03 = np.float32(0.0)
    s10 = s11 = s12 = s13 = np.float32(0.0)
    for k in range(v.shape[1]):
        w0 = v[n, k]
        w1 = v[n + 1, k]
        x0 = a[m, k]
        x1 = a[m + 1, k]
        x2 = a[m + 2, k]
        x3 = a[m + 3, k]
        s00 += x0 * w0
        s01 += x1 * w0
        s02 += x2 * w0
        s03 += x3 * w0
        s10 += x0 * w1
        s11 += x1 * w1
        s12 += x2 * w1
        s13 += x3 * w1
    return s00, s01, s02, s03, s10, s11, s12, s13


@njit(inline="always")
def _two_by_one(v, a, n, m):
    """(v[n] . a[m], v[n+1] . a[m]) in one pass over K."""
    s0 = s1 = np.float32(0.0)
    for k in range(v.shape[1]):
        x = a[m, k]
        s0 += x * v[n, k]
        s1 += x * v[n + 1, k]
    return s0, s1


@njit(inline="always")
def _one_by_one(v, a, n, m):
    s = np.float32(0.0)
    for k in range(v.shape[1]):
        s += a[m, k] * v[n, k]
    return s


@njit(inline="always")
def blocked_rows(v, a, c, n0, rows):
    """c[:, n0:n0+rows] = a @ v[n0:n0+rows]^T for fp32 weights v [N, K] and activations a [M, K] (both
    C-contiguous): pairs of weight rows against blocks of four activation rows, then the activation rows
    left one at a time, then an odd last weight row. njit code only, in a loop compiled with `reassoc`."""
    m_rows = a.shape[0]
    whole = m_rows - m_rows % 4
    for r in range(0, rows - 1, 2):
        n = n0 + r
        for m in range(0, whole, 4):
            s = _two_by_four(v, a, n, m)
            c[m, n], c[m + 1, n], c[m + 2, n], c[m + 3, n] = s[0], s[1], s[2], s[3]
            c[m, n + 1], c[m + 1, n + 1], c[m + 2, n + 1], c[m + 3, n + 1] = s[4], s[5], s[6], s[7]
        for m in range(whole, m_rows):
            c[m, n], c[m, n + 1] = _two_by_one(v, a, n, m)
    if rows % 2:
        n = n0 + rows - 1
        for m in range(m_rows):
            c[m, n] = _one_by_one(v, a, n, m)
