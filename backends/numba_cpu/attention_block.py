"""The online-softmax attention of one block of query rows, a library function compiled once per process
(and kept in Numba's on-disk cache) that every generated attention kernel calls from a thin parallel loop.

A generated kernel used to hold the whole flash recurrence in its parallel loop's body: Numba's parfor
passes then copy and analyse that body (its copy propagation deep-copies the loop's IR) and LLVM optimizes
it once per kernel, 10 of a stories15M cold start's 32 CPU seconds for the symbolic prefill's attention
alone. What differs per model stays generated: where the query, key and value rows lie (their views), the
key limit of each row (the causal or decode-position mask) and the score's scale; they come here as
arrays and numbers.

`flash_rows(q, k, v, kx, vx, limits, scale, divide, kv_block, out)`: row r of `out` = softmax(X_r) . V,
where X_r[j] = (q[r] . k[j]) / scale (or * scale when not `divide`) for the keys j < limits[r] (the others
weigh 0), then the keys of kx (values vx), which stand at positions limits[r].. of the key axis in place of
what k and v hold there: a decode step's new key and value, while k and v are the cache whose row at the
position is stale. Keys stream in blocks of `kv_block`, all the rows against one key block before the
next, each row's running max and sum rescaling its output once per block (nothing of size rows x keys).
A row that sees no key is nan, as eager's softmax of only -inf, and a row is nan in each column where a
key it does not see (j >= limits[r] + the keys of kx) has an inf or nan value (eager's 0 * inf). `flash_rows_gemm` computes the block's two products as
single-threaded MKL GEMMs (`mkl.gemm_tile_mkl`, prefill); `flash_rows` as eight keys' Q.K dots side by
side (`matvec.dot`) and a P.V update holding the output row in registers (`rowops.weighted_rows`, decode).

Generated kernels call them through `flash_block_rows`, `flash_block_gemm` and `flash_block_new`
(`attention_flash.py` writes the call), not as njit functions, which Numba would link into every kernel for LLVM to optimize again
there: each is a C-callable copy bound to a symbol (`SYMBOLS`) that the kernel declares by name, so its
machine code refers to the library by name and stays cacheable.
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from numba import carray, cfunc, njit, types

from fusec.backends.numba_cpu.blas import _ptr
from fusec.backends.numba_cpu.fastexp import exp32
from fusec.backends.numba_cpu.matvec import dot
from fusec.backends.numba_cpu.mkl import UNAVAILABLE, gemm_tile_mkl
from fusec.backends.numba_cpu.rowops import prefetch_rows, row_axpy, row_dot, row_finite, weighted_rows

KEYS_AT_ONCE = 8  # the keys whose dot products with a query row `_scores_rows` sums side by side
LANES = 16  # partial results of a row's max and sum: one AVX-512 register of float32 (two AVX2 ones)
SYMBOLS = {False: "fusec_attention_flash_rows", True: "fusec_attention_flash_gemm"}  # by `gemm`


@njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _lane_max(row, n, lane):
    """max(row[:n]) in LANES partial maxima (a chain of one accumulator does not vectorize)."""
    nv = n // LANES * LANES
    for u in range(LANES):
        lane[u] = np.float32(-np.inf)
    for jb in range(0, nv, LANES):
        for u in range(LANES):
            lane[u] = max(lane[u], row[jb + u])
    out = np.float32(-np.inf)
    for u in range(LANES):
        out = max(out, lane[u])
    for j in range(nv, n):
        out = max(out, row[j])
    return out


@njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _exp_sum(row, n, mx, lane):
    """row[:n] = exp(row[:n] - mx), returning their sum in LANES partial sums (the order differs from one
    running sum's, as any vectorized sum's does)."""
    for j in range(n):
        row[j] = exp32(row[j] - mx)
    nv = n // LANES * LANES
    for u in range(LANES):
        lane[u] = np.float32(0.0)
    for jb in range(0, nv, LANES):
        for u in range(LANES):
            lane[u] = lane[u] + row[jb + u]
    out = np.float32(0.0)
    for u in range(LANES):
        out = out + lane[u]
    for j in range(nv, n):
        out = out + row[j]
    return out


@njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _scaled(s, scale, divide):
    return s / scale if divide else s * scale


@njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _dot(x, i, y, j):
    """x[i] . y[j]: a 16-lane vector dot (`rowops`) when the rows are a multiple of 16 long."""
    if x.shape[1] % LANES == 0:
        return row_dot(x, (i,), y, (j,))
    s = np.float32(0.0)
    for d in range(x.shape[1]):
        s += x[i, d] * y[j, d]
    return s


@njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _axpy(o, i, v, j, p):
    """o[i] += p * v[j] (a vector update, `rowops`, when the rows are a multiple of 16 long)."""
    if o.shape[1] % LANES == 0:
        row_axpy(o, (i,), v, (j,), p)
    else:
        for e in range(o.shape[1]):
            o[i, e] += p * v[j, e]


@njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _finite(v, j):
    """Whether every value of row j is finite (a vector check, `rowops`, when it is a multiple of 16 long)."""
    if v.shape[1] % LANES == 0:
        return row_finite(v, (j,))
    for e in range(v.shape[1]):
        if not np.isfinite(v[j, e]):
            return False
    return True


@njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _scores_gemm(q, k, v, sblk, limits, rlo, rhi, j0, jn):
    """sblk[r, :jn] = q[r] . k[j0 + j] for the rows rlo..rhi: one MKL GEMM (keys past a row's limit too)."""
    gemm_tile_mkl(q[rlo:rhi], k[j0:j0 + jn], sblk[rlo:rhi, :jn], True)


@njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _scores_rows(q, k, v, sblk, limits, rlo, rhi, j0, jn):
    """sblk[r, j] = q[r] . k[j0 + j] for the rows rlo..rhi and the keys they see: KEYS_AT_ONCE keys side by
    side (`matvec.dot`: their lane sums share each load of q[r], and the next keys' rows are prefetched),
    then one at a time; the first row's pass also asks for the keys' value rows, which `_update_rows` reads
    next (a decode step reads a head's keys and values once, from memory, in streams too short for the
    hardware prefetcher). One key's dot alone was a chain of dependent FMAs and a reduction per key: a
    decode step's attention of 12 heads at 100 positions took 33 us from the cache, 19 us with this; from
    memory (the cache evicted between calls as a step's weights do) 89-94 us, 83-84 us with this."""
    for r in range(rlo, rhi):
        n = max(0, min(limits[r], j0 + jn) - j0)
        j = 0
        if q.shape[1] % LANES == 0:
            while j + KEYS_AT_ONCE <= n:
                if r == rlo:
                    prefetch_rows(v, j0 + j, KEYS_AT_ONCE)  # (their values, read next)
                d = dot((k,), (q,), j0 + j, r, KEYS_AT_ONCE)
                for t in range(KEYS_AT_ONCE):
                    sblk[r, j + t] = d[t]
                j += KEYS_AT_ONCE
        for i in range(j, n):
            sblk[r, i] = _dot(q, r, k, j0 + i)


@njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _update_gemm(sblk, v, out, pv, limits, rlo, rhi, j0, jn):
    """out[r] += sblk[r, :jn] . v[j0:j0 + jn] for the rows rlo..rhi: one MKL GEMM."""
    gemm_tile_mkl(sblk[rlo:rhi, :jn], v[j0:j0 + jn], pv[rlo:rhi], False)
    for r in range(rlo, rhi):
        for e in range(out.shape[1]):
            out[r, e] += pv[r, e]


@njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _update_rows(sblk, v, out, pv, limits, rlo, rhi, j0, jn):
    """out[r] += sblk[r, j] * v[j0 + j] for the rows rlo..rhi and the keys they see, key after key: the
    row's vectors held in registers over the keys (`rowops.weighted_rows`; `_masked_values` gives the
    others' 0 * inf). A load and a store of the row per key (`row_axpy`) took about half a decode step's
    attention from the cache."""
    for r in range(rlo, rhi):
        n = max(0, min(limits[r], j0 + jn) - j0)
        if out.shape[1] % LANES == 0:
            weighted_rows(out, r, v, j0, n, sblk[r])
        else:
            for j in range(n):
                _axpy(out, r, v, j0 + j, sblk[r, j])


def _flash(scores, update):
    """`flash_rows` with the products `scores` and `update` (GEMMs or vector row operations): the choice
    is made here, not by a flag, so that the copy without GEMMs never refers to MKL."""
    @njit(fastmath={"contract"}, error_model="numpy", nogil=True)
    def flash_rows(q, k, v, kx, vx, limits, scale, divide, kv_block, out):
        """See the module's doc. q [rows, D], k [keys, D], v [all keys, Dv] (those past every row's limit
        too: `_masked_values`), kx [X, D], vx [X, Dv] (X may be 0), out [rows, Dv], all C-contiguous
        float32; limits [rows] int64 (each at most `keys`)."""
        nq, dv = out.shape
        klim = 0
        for r in range(nq):
            klim = max(klim, limits[r])
        mrow = np.full(nq, np.float32(-np.inf))
        lrow = np.zeros(nq, np.float32)
        lane = np.empty(LANES, np.float32)
        sblk = np.empty((nq, kv_block), np.float32)
        pv = np.empty((nq, dv), np.float32)
        out[:] = np.float32(0.0)
        for j0 in range(0, klim, kv_block):
            jn = min(klim, j0 + kv_block) - j0
            rlo, rhi = nq, 0  # the rows that see a key of this block
            for r in range(nq):
                if limits[r] > j0:
                    rlo = min(rlo, r)
                    rhi = r + 1
            if rlo >= rhi:
                continue
            scores(q, k, v, sblk, limits, rlo, rhi, j0, jn)
            for r in range(rlo, rhi):
                n = max(0, min(limits[r], j0 + jn) - j0)  # the row's keys in this block
                srow = sblk[r]
                for j in range(n):
                    srow[j] = _scaled(srow[j], scale, divide)
                mn = max(mrow[r], _lane_max(srow, n, lane))
                if mn > np.float32(-np.inf):
                    rescale = exp32(mrow[r] - mn)
                    lrow[r] = lrow[r] * rescale + _exp_sum(srow, n, mn, lane)
                    mrow[r] = mn
                    for e in range(dv):
                        out[r, e] *= rescale
                else:  # every key so far masked (-inf): all weigh 0
                    for j in range(n):
                        srow[j] = np.float32(0.0)
                for j in range(n, jn):  # keys past the row's limit weigh 0
                    srow[j] = np.float32(0.0)
            update(sblk, v, out, pv, limits, rlo, rhi, j0, jn)
        for r in range(nq):
            for x in range(kx.shape[0]):
                _extra_key(q, r, kx, vx, x, scale, divide, mrow, lrow, out)
            for e in range(dv):
                out[r, e] = out[r, e] / lrow[r]
        _masked_values(v, limits, kx.shape[0], out)
    return flash_rows


@njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _extra_key(q, r, kx, vx, x, scale, divide, mrow, lrow, out):
    """Row r's running max, sum and output taking key x of kx (value vx[x]) after the keys before it."""
    s = _scaled(_dot(q, r, kx, x), scale, divide)
    m = mrow[r]
    mn = m if m >= s else s  # (a nan score stays nan, as in eager's softmax)
    if mn == np.float32(-np.inf):  # this key and every one before it masked: all weigh 0
        return
    rescale = exp32(m - mn)
    p = exp32(s - mn)
    lrow[r] = lrow[r] * rescale + p
    mrow[r] = mn
    for e in range(out.shape[1]):
        out[r, e] *= rescale
    _axpy(out, r, vx, x, p)


flash_rows = _flash(_scores_rows, _update_rows)  # decode, and where MKL is not used
flash_rows_gemm = _flash(_scores_gemm, _update_gemm)


@njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _masked_values(v, limits, skip, out):
    """Row r of `out` nan in each column where a key it does not see (limits[r] + skip <= j < keys: `skip`
    keys at the limit replaced by those of kx, `flash_rows`) has an inf or
    nan value. Eager multiplies masked keys' values by their probability 0, and 0 * inf or 0 * nan is
    nan: one such key makes every row that masks it nan in that column, while the key loops above stop at
    each row's limit. One pass over the masked value rows (most are finite: one vector check each), the
    columns only where one is not."""
    nq, dv = out.shape
    lo = v.shape[0]
    for r in range(nq):
        lo = min(lo, limits[r] + skip)
    vlast = -1  # the last masked key with a value not finite, and per column the last such key
    vcol = np.full(dv, -1, np.int64)
    for j in range(lo, v.shape[0]):
        if _finite(v, j):
            continue
        for e in range(dv):
            if not np.isfinite(v[j, e]):
                vlast = j
                vcol[e] = j
    if vlast < 0:
        return
    for r in range(nq):
        if vlast >= limits[r] + skip:
            for e in range(dv):
                if vcol[e] >= limits[r] + skip:
                    out[r, e] = np.float32(np.nan)


_P, _N = types.voidptr, types.intp
# (q, k, v, kx, vx, limits, out, rows, keys of k, keys of v, keys of kx, D, Dv, scale, divide, kv_block):
# pointers to C-contiguous arrays, then their sizes
C_SIGNATURE = types.void(_P, _P, _P, _P, _P, _P, _P, _N, _N, _N, _N, _N, _N, types.float32, _N, _N)


@njit(inline="always")
def _arrays(q, k, v, kx, vx, limits, out, nq, nk, nv, nx, d, dv):
    return (carray(q, (nq, d), np.float32), carray(k, (nk, d), np.float32), carray(v, (nv, dv), np.float32),
            carray(kx, (nx, d), np.float32), carray(vx, (nx, dv), np.float32),
            carray(limits, (nq,), np.int64), carray(out, (nq, dv), np.float32))


@cfunc(C_SIGNATURE, cache=True)
def _rows_entry(q, k, v, kx, vx, limits, out, nq, nk, nv, nx, d, dv, scale, divide, kv_block):
    q, k, v, kx, vx, limits, out = _arrays(q, k, v, kx, vx, limits, out, nq, nk, nv, nx, d, dv)
    flash_rows(q, k, v, kx, vx, limits, scale, divide != 0, kv_block, out)


# bound once per process, before any kernel that calls them is compiled or loaded from the cache
llvm.add_symbol(SYMBOLS[False], _rows_entry.address)
_flash_rows_c = types.ExternalFunction(SYMBOLS[False], C_SIGNATURE)
_flash_gemm_c = types.ExternalFunction(SYMBOLS[True], C_SIGNATURE)
if not UNAVAILABLE:  # the GEMM copy calls MKL: only where its symbols are bound
    @cfunc(C_SIGNATURE, cache=True)
    def _gemm_entry(q, k, v, kx, vx, limits, out, nq, nk, nv, nx, d, dv, scale, divide, kv_block):
        q, k, v, kx, vx, limits, out = _arrays(q, k, v, kx, vx, limits, out, nq, nk, nv, nx, d, dv)
        flash_rows_gemm(q, k, v, kx, vx, limits, scale, divide != 0, kv_block, out)

    llvm.add_symbol(SYMBOLS[True], _gemm_entry.address)


@njit(inline="always")
def _rows(a):
    """`a` (2-d float32) with rows one after the other (a copy only when its rows are not)."""
    if a.strides[1] == 4 and (a.strides[0] == 4 * a.shape[1] or a.shape[0] <= 1):
        return a
    return np.ascontiguousarray(a)


@njit(inline="always")
def _call(entry, q, k, v, kx, vx, limits, scale, divide, kv_block, out):
    q, k, v, kx, vx = _rows(q), _rows(k), _rows(v), _rows(kx), _rows(vx)
    entry(_ptr(q), _ptr(k), _ptr(v), _ptr(kx), _ptr(vx), _ptr(limits), _ptr(out), out.shape[0], k.shape[0],
          v.shape[0], kx.shape[0], q.shape[1], out.shape[1], np.float32(scale), 1 if divide else 0, kv_block)
    return q.shape[0] + k.shape[0] + v.shape[0] + kx.shape[0] + vx.shape[0]  # (the copies live until here)


@njit(cache=True, nogil=True)
def flash_block_rows(q, k, v, limits, scale, divide, kv_block, out):
    """`flash_rows` without GEMMs (see the module's doc), called from generated kernels: q [rows, D],
    k [keys, D], v [keys, Dv] float32, limits [rows] int64 (each at most keys), out [rows, Dv]; limits and
    out C-contiguous (q, k and v are copied when their rows are not one after the other)."""
    return _call(_flash_rows_c, q, k, v, q[:0], out[:0], limits, scale, divide, kv_block, out)


@njit(cache=True, nogil=True)
def flash_block_gemm(q, k, v, limits, scale, divide, kv_block, out):
    """`flash_block_rows` with the two products as MKL GEMMs (prefill)."""
    return _call(_flash_gemm_c, q, k, v, q[:0], out[:0], limits, scale, divide, kv_block, out)


@njit(cache=True, nogil=True)
def flash_block_new(q, k, v, kx, vx, limits, scale, divide, kv_block, out):
    """`flash_block_rows` with keys kx [X, D] and values vx [X, Dv] seen after each row's others, at the
    positions limits[r].. (a decode step's new key and value; k and v its cache, read in place)."""
    return _call(_flash_rows_c, q, k, v, kx, vx, limits, scale, divide, kv_block, out)
