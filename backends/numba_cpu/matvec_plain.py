"""The matrix-vector fallback for weights the vector loop (`matvec.py`) cannot read: not C-contiguous,
or bf16 bits of an odd K. `streams` says which loop a call takes; `plain` runs this one, and compiles to
nothing in a kernel whose operand types already rule it out.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from fusec.backends.numba_cpu.blas import load_bf16, row_groups

FASTMATH = {"reassoc", "contract"}  # every matrix-vector loop's: vectorized sums; NaN and inf keep their meaning


@njit(inline="always")
def _rows_plain(a, w, c, n0):
    """c[:, n0:n0+4] = a @ w[n0:n0+4]^T for weights of any strides (float32, or bf16 bits widened one at a
    time): four rows share the activation loads; the sums are vectorized where the strides allow."""
    m_rows, k_dim = a.shape
    n_dim = w.shape[0]
    if n0 + 4 <= n_dim:
        for m in range(m_rows):
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for k in range(k_dim):
                x = a[m, k]
                s0 += x * load_bf16(w[n0, k])
                s1 += x * load_bf16(w[n0 + 1, k])
                s2 += x * load_bf16(w[n0 + 2, k])
                s3 += x * load_bf16(w[n0 + 3, k])
            c[m, n0] = s0
            c[m, n0 + 1] = s1
            c[m, n0 + 2] = s2
            c[m, n0 + 3] = s3
    else:
        for n in range(n0, n_dim):
            for m in range(m_rows):
                s = np.float32(0.0)
                for k in range(k_dim):
                    s += a[m, k] * load_bf16(w[n, k])
                c[m, n] = s


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_plain(a, w, c):
    """c = a @ w^T one weight row at a time, for weights the vector loop cannot read (`streams`)."""
    for g in prange(row_groups(w, 4)):
        _rows_plain(a, w, c, 4 * g)


def streams(a, w):
    """Whether the vector loop can read weight w and the activations a: both C-contiguous, and for bf16
    bits an even K (they are read two at a time). Else `matvec_plain`."""
    raise NotImplementedError("matvec.streams runs inside njit code only")


def _always_streams(a, w) -> bool:
    """Whether the types alone say the vector loop can read them: float32 weights and activations that
    are C-contiguous arrays (what generated kernels pass)."""
    return a.layout == "C" and w.layout == "C" and w.dtype != types.uint16


@overload(streams)
def _streams(a, w):
    if _always_streams(a, w):
        return lambda a, w: True
    if w.dtype == types.uint16:
        return lambda a, w: a.shape[1] % 2 == 0 and w.flags.c_contiguous and a.flags.c_contiguous
    return lambda a, w: w.flags.c_contiguous and a.flags.c_contiguous


def plain(a, w, c, ws):
    """`matvec_plain(a, w, c)`, the fallback of a call on weights `ws` (a tuple), unless `streams` is true
    for all of them by their types alone: then nothing (the branch never runs), so that a kernel calling the
    matrix-vector loop does not link (and LLVM optimize again) a parallel loop it never runs. njit code only."""
    raise NotImplementedError("matvec.plain runs inside njit code only")


@overload(plain)
def _plain(a, w, c, ws):
    if all(_always_streams(a, v) for v in ws):
        return lambda a, w, c, ws: None
    return lambda a, w, c, ws: matvec_plain(a, w, c)
