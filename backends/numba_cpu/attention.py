"""The `attention` kernel, one block of query rows of one (batch, head) per parallel iteration, the
blocks and key blocks sized by the tiling pass (`q`, `kv`); Q, K and V are read through their views, so
grouped-query heads and concatenated past/new K/V are index arithmetic, never copies.

When the row region is a softmax of a score expression X (X = scale/mask of S = q.K^T), the block runs
flash style: keys stream in blocks of the `kv` tile, all the block's rows against one key block before
the next; each row's running max and sum rescale its output row once per key block (online softmax), and
nothing of size T x T exists anywhere. When the attention library computes the score expression
(`attention_flash.library_scale`: the scores scaled by a constant under a key-limit mask), that recurrence
is one call of `attention_block.py` per block, not generated here. Any other row region (e.g. a guard
for fully masked rows) runs row by row with a buffer of scores: reductions first, then P.V. Either way a
constant mask that hides every key after a row-dependent limit (causal) bounds the key loop, so masked
keys cost nothing. With MKL and enough query rows (prefill), the flash blocks' two products are GEMMs
(`attention_gemm.py`); else (decode)
Q.K and P.V are vector operations on rows of the operand arrays where the rows are plain arrays
(`attention_rows.py`, `rowops.py`).
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from fusec.backends.numba_cpu.attention_flash import decode_keys, emit_library_call, library_scale, values_in_place
from fusec.backends.numba_cpu.attention_mask import key_limit
from fusec.backends.numba_cpu.attention_gemm import KEY, block_max, online_softmax_gemm, rescale_row, start_rows
from fusec.backends.numba_cpu.attention_rows import array_row, lane_dot, row_call, row_leaves
from fusec.backends.numba_cpu.expr import Emitter, _broadcast, reshape_index
from fusec.backends.numba_cpu.mkl import blas_choice
from fusec.backends.numba_cpu.stores import emit_outputs
from fusec.symbolic import upper

# A decode step's attention (one query row per batch and head) of at most this many elements (rows x keys
# x (depth + value depth)) runs on the calling thread: Numba's parallel-loop passes cost its compile
# about 2 s of CPU (3.7 against 1.6 s), a tenth of a cold start. Below this size the parallel loop saves a
# few microseconds per call (stories15M: 6 heads x 256 keys x 96); above it, a share of the step worth
# keeping (stories110M at 1024 keys: 0.15 against 0.30 ms per layer on an idle machine, ~1.8 ms a step).
DECODE_SERIAL = 1 << 18


def emit_attention(em: Emitter, anchors: tuple[int, int], outs: list[str], tiles: dict) -> str:
    """The attention loops over blocks of the tiling pass's tiles: each parallel iteration takes `q`
    query rows of one (batch, head) and, flash style, streams the keys in blocks of `kv` (all its rows
    against one block before the next), so one key/value block serves `q` rows while it is in cache.
    A kernel without tiles runs as one tile (every row, every key). Per-block buffers are allocated once
    per parallel iteration, and the output is written straight through its views (no copy)."""
    g, w = em.g, em.w
    s_id, o_id = anchors
    qv, kv = g.nodes[s_id].args
    p_id, vv = g.nodes[o_id].args
    s_shape, o_shape = g.nodes[s_id].shape, g.nodes[o_id].shape
    batch, tq, tk = s_shape[:-2], s_shape[-2], s_shape[-1]
    depth, dv = g.nodes[qv].shape[-1], o_shape[-1]
    entries = 1
    for d in batch:
        entries *= d
    rows = entries * tq
    softmax = _softmax_operand(g, p_id)
    if softmax is not None:
        x_row, x_index = softmax
    else:
        x_row, x_index = _first_max_operand(g), (lambda ix: ix)
        if x_row is not None and g.nodes[x_row].shape != s_shape:
            x_row = None  # the key bound needs X's index; only worked out when X has S's shape
    q_block, kv_block = tiles.get("q") or upper(tq), tiles.get("kv") or upper(tk)
    store = _direct_store(g, o_id, outs)
    if store is None:  # the output is more than a view of O: O into a buffer, the outputs from it
        w.line(f"obuf = np.empty(({', '.join(str(d) for d in o_shape)},), np.float32)")
        w.define("obuf")
        store = lambda ix: f"obuf[{', '.join(ix)}]"  # noqa: E731
        em.overrides[o_id] = store
    work = upper(rows * tk * (depth + dv))  # symbolic: its upper bound
    parallel = work >= tiles["parallel_min"] * 4 and not (upper(tq) == 1 and work <= DECODE_SERIAL)
    masked = x_row is not None and key_limit(em, x_row, x_index(tuple("0" for _ in s_shape))) is not None
    blocks = -(-tq // q_block) if isinstance(tq, int) else f"((({tq}) + {q_block - 1}) // {q_block})"
    chunks = entries * blocks if isinstance(blocks, int) else f"{entries} * {blocks}"
    loop = "prange" if parallel and upper(rows) > q_block else "range"
    # the products as MKL GEMMs per block from `gemm_rows` query rows (not for a few: decode)
    gemms = blas_choice()[0] == "mkl" and upper(tq) >= tiles["gemm_rows"]
    with em.loop(f"for c in {loop}({chunks})", ("c",)):
        w.line(f"oacc = np.empty(({q_block}, {dv}), np.float32)")  # per parallel iteration, not per row
        w.define("oacc")
        w.line(f"bflat = c // {blocks}")
        w.define("bflat")
        bidx, _ = _split_index(em, "bflat", list(batch) + [1])
        w.line(f"i0 = (c % {blocks}) * {q_block}")
        w.line(f"i1 = min({tq}, i0 + {q_block})")

        def limit(i: str) -> str:
            bound = key_limit(em, x_row, x_index(bidx + (i, "0"))) if x_row is not None else None
            return bound if bound is not None else str(tk)

        # the flash recurrence as one call of the attention library (`attention_flash.py`) when it
        # computes this score expression: it returns the rows normalized, its masked values checked. For
        # one query row only with a decode step's keys (`decode_keys`): packing keys chosen per key (past or
        # new) for the library made a stories15M decode step 5-20% slower
        scale = library_scale(em, x_row, s_id, x_index(tuple("0" for _ in s_shape))) if softmax is not None else None
        new_key = None
        if scale is not None and upper(tq) == 1:
            new_key = decode_keys(em, anchors, x_row, x_index(bidx + ("i0", "0")), bidx)
            scale = scale if new_key is not None else None
        generated_flash = softmax is not None and scale is None
        scan = masked and (scale is None or not (new_key or values_in_place(em, vv, bidx)))
        if scan:
            _scan_masked_values(em, vv, bidx, tk, dv, limit)
        lanes = next((n for n in (16, 8) if depth % n == 0), 0) if isinstance(depth, int) else 0
        if lanes and generated_flash and not gemms:
            w.line(f"slane = np.empty({lanes}, np.float32)")  # per parallel iteration, not per key
            w.define("slane")

        def score(i: str, j: str) -> None:  # s = q_i . k_j
            q_at = lambda d: em.value(qv, _broadcast(bidx, g.nodes[qv].shape[:-2]) + (i, d))  # noqa: E731
            k_at = lambda d: em.value(kv, _broadcast(bidx, g.nodes[kv].shape[:-2]) + (d, j))  # noqa: E731
            qrow = array_row(em, qv, _broadcast(bidx, g.nodes[qv].shape[:-2]) + (i, ":"))
            krow = array_row(em, kv, _broadcast(bidx, g.nodes[kv].shape[:-2]) + (":", j))
            if qrow and krow:  # contiguous rows: an explicit vector dot (`rowops`)
                w.line("s = " + row_call(qrow, lambda x: row_call(krow, lambda y: f"row_dot({x}, {y})")))
            elif lanes and softmax is not None:
                lane_dot(em, depth, lanes, q_at, k_at)
            else:
                w.line("s = np.float32(0.0)")
                with em.loop(f"for d in range({depth})", ("d",)):
                    w.line(f"s += {q_at('d')} * {k_at('d')}")
            w.define("s")  # the override of S reads it: what depends on S stays in this key loop

        def accumulate(j: str, p: str) -> None:  # oacc[r] += p * v_j
            vrow = array_row(em, vv, _broadcast(bidx, g.nodes[vv].shape[:-2]) + (j, ":"))
            if vrow:  # a contiguous row: an explicit vector update (`rowops`)
                w.line(row_call(vrow, lambda y: f"row_axpy(oacc, (r,), {y}, {p})"))
                return
            with em.loop(f"for e in range({dv})", ("e",)):
                v = em.value(vv, _broadcast(bidx, g.nodes[vv].shape[:-2]) + (j, "e"))
                w.line(f"oacc[r, e] += {p} * {v}")

        if scale is not None:
            emit_library_call(em, anchors, scale, bidx, (q_block, kv_block), limit, gemms, new_key)
        elif softmax is not None and gemms:
            online_softmax_gemm(em, s_id, (x_row, x_index, bidx), q_block, kv_block, depth, dv, limit,
                                lambda i, d: em.value(qv, _broadcast(bidx, g.nodes[qv].shape[:-2]) + (i, d)),
                                lambda j, d: em.value(kv, _broadcast(bidx, g.nodes[kv].shape[:-2]) + (d, j)),
                                lambda j, e: em.value(vv, _broadcast(bidx, g.nodes[vv].shape[:-2]) + (j, e)),
                                lambda j: array_row(em, kv, _broadcast(bidx, g.nodes[kv].shape[:-2]) + (":", j)),
                                lambda j: array_row(em, vv, _broadcast(bidx, g.nodes[vv].shape[:-2]) + (j, ":")))
        elif softmax is not None:
            _online_softmax(em, s_id, softmax, bidx, q_block, kv_block, limit, score, accumulate)
        else:
            w.line(f"srow = np.empty({tk}, np.float32)")
            w.define("srow")
        with em.loop("for i in range(i0, i1)", ("i",)):
            w.line("r = i - i0")
            w.define("r")
            if scan or scale is None:
                w.line(f"lim = {limit('i')}")
            if softmax is None:
                with em.loop(f"for e0 in range({dv})", ("e0",)):
                    w.line("oacc[r, e0] = np.float32(0.0)")
                _row_buffer(em, s_id, p_id, bidx, score, accumulate)
            if scan:  # keys past the limit weigh 0, and 0 * inf or nan is nan (`_scan_masked_values`)
                with em.loop("if vlast >= lim", barrier=True):
                    with em.loop(f"for e3 in range({dv})", ("e3",)):
                        w.line("if vcol[e3] >= lim:")
                        w.line("    oacc[r, e3] = np.float32(np.nan)")
            with em.loop(f"for e2 in range({dv})", ("e2",)):
                w.line(f"{store(bidx + ('i', 'e2'))} = oacc[r, e2]{' / lrow[r]' if generated_flash else ''}")
    if o_id in em.overrides:
        emit_outputs(em, outs)
    if scale is not None:
        return "attention-library"
    return "attention-online" if softmax is not None else "attention-rowbuffer"


def _direct_store(g, o_id: int, outs: list[str]):
    """When the kernel's one output is O seen through reshapes and permutes: a function of an index of O
    giving the output element it lands in (`o0[...]`), so the row is written there directly; else None."""
    if len(g.outputs) != 1:
        return None
    chain, node = [], g.outputs[0]
    while node != o_id and g.nodes[node].op in ("reshape", "permute"):
        chain.append(g.nodes[node])
        node = g.nodes[node].args[0]
    if node != o_id:
        return None

    def store(ix: tuple[str, ...]) -> str:
        for n in reversed(chain):  # from O outwards: each view's index of the element at ix
            src = g.nodes[n.args[0]].shape
            if n.op == "reshape":
                ix = tuple(reshape_index(ix, src, n.shape))
            else:
                ix = tuple(ix[p] for p in n.attr("perm"))
        shape = g.nodes[g.outputs[0]].shape
        return f"{outs[0]}[{', '.join('0' if d == 1 else i for d, i in zip(shape, ix))}]"
    return store


def _split_index(em: Emitter, flat: str, dims: list[int]) -> tuple[tuple[str, ...], str]:
    """Variables of the index into `dims` of the row-major position `flat`: (all but the last, the last)."""
    idx, rest = [], 1
    for d in dims:
        rest *= d
    for d in dims:
        rest //= d
        var = em.tmp("b")
        em.w.line(f"{var} = ({flat} // {rest}) % {d}" if rest != 1 else f"{var} = {flat} % {d}")
        em.w.define(var)
        idx.append(var)
    return tuple(idx[:-1]), idx[-1]


def _scan_masked_values(em: Emitter, vv: int, bidx, tk, dv: int, limit) -> None:
    """`vlast`: the last key masked for some row of this block (at or past the least of the rows'
    limits) whose value row holds an inf or nan (else -1), and per value column `vcol[e]` the last such
    key with column e not finite.

    Eager multiplies masked keys' values by their probability 0, and 0 * inf or 0 * nan is nan: one
    such key makes every row that masks it nan in that column. The key loops stop at the limit, so the
    rows where this matters (only they: `vlast >= lim`) set those columns to nan (`vcol[e] >= lim`),
    without reading the values again. One pass over the block's masked values, not per row, inside the
    block's parallel iteration: a parallel loop of its own costs more than the pass whenever the cores
    are busy. Where the rows lie in whole spans (`_finite_spans`), one vector check over those comes
    first, and the pass runs only when it finds an inf or nan."""
    w, g = em.w, em.g
    w.line(f"lo = {tk}")
    with em.loop("for qi in range(i0, i1)", ("qi",)):
        w.line(f"lo = min(lo, {limit('qi')})")
    w.line("vlast = -1")
    w.define("vlast")
    w.line(f"vcol = np.full({dv}, -1, np.int64)")
    w.define("vcol")
    lead = _broadcast(bidx, g.nodes[vv].shape[:-2])
    spans = _finite_spans(em, vv, lead, tk)
    if spans is not None:
        w.line(f"vok = {spans}")
        w.define("vok")
    checked = em.loop("if not vok", barrier=True) if spans is not None else nullcontext()
    with checked, em.loop(f"for jm in range(lo, {tk})", ("jm",)):
        vrow = array_row(em, vv, lead + ("jm", ":"))
        if vrow:  # a contiguous row: one vector check, the columns only when it holds an inf or nan
            w.line(f"if {row_call(vrow, lambda y: f'row_finite({y})')}:")
            w.line("    continue")
        with em.loop(f"for e in range({dv})", ("e",)):
            v = em.value(vv, lead + ("jm", "e"))
            w.line(f"if not np.isfinite({v}):")
            w.line("    vlast = jm")
            w.line("    vcol[e] = jm")


def _finite_spans(em: Emitter, vv: int, lead: tuple, tk) -> str | None:
    """An expression that is true when every value row of keys lo..tk is finite, checked a span of rows
    at a time (`row_finite` of many rows as one): each row a key may read is either row j of an array
    whose key axis is the one before the row's, so keys lo..tk are rows lo..tk of it, one after the other
    (the decode step's cache), or a row no key moves (its new row), checked once. None when some row lies
    otherwise. True does not depend on which row each key chooses; false only sends the scan row by row.
    At stories15M's 256 keys and position 40 the scan row by row was over half the decode attention's time."""
    row = array_row(em, vv, lead + (KEY, ":"), condition=lambda node, index: "")
    if not row:
        return None
    checks = []
    for leaf in row_leaves(row):
        _, array, index = leaf
        before, _, last = index.rpartition(", ")
        if KEY not in index:
            checks.append(row_call(leaf, lambda y: f"row_finite({y})"))
        elif last.strip("()") == KEY and last.count("(") == last.count(")") and KEY not in before:
            rows = f"{array}[{before}][lo:{tk}]" if before else f"{array}[lo:{tk}]"
            checks.append(f"row_finite({rows}.reshape(((({tk}) - lo) * {array}.shape[-1],)), ())")
        else:
            return None
    return " and ".join(checks)


def _online_softmax(em: Emitter, s_id: int, softmax, bidx, q_block: int, kv_block: int, limit, score,
                    accumulate) -> None:
    """Flash attention's recurrence over the rows i0..i1 of this block: key blocks outside, rows inside,
    each row with a running max `mrow[r]` and sum `lrow[r]`. The key blocks run up to the largest limit
    of the block's rows; a row stops at its own."""
    w = em.w
    x_id, x_index = softmax
    for name, size in (("mrow", q_block), ("lrow", q_block), ("xblk", kv_block)):
        w.line(f"{name} = np.empty({size}, np.float32)")
        w.define(name)
    with start_rows(em, limit):
        pass
    with em.loop(f"for j0 in range(0, klim, {kv_block})", ("j0",)):
        with em.loop("for i in range(i0, i1)", ("i",)):
            w.line("r = i - i0")
            w.define("r")
            w.line(f"j1 = min({limit('i')}, j0 + {kv_block})")
            block_max(em, s_id, (x_id, x_index, bidx), lambda: score("i", "j"), "xblk[j - j0]")
            with em.loop("if mn > np.float32(-np.inf)", barrier=True):  # only masked keys so far: adds 0
                rescale_row(em)
                w.line("l = np.float32(0.0)")
                # the exponentials in a loop of their own, which LLVM vectorizes (beside the P.V update
                # it stayed scalar: a decode step's attention took 1.15-1.2x as long)
                with em.loop("for j in range(j0, j1)", ("j",)):
                    w.line("xblk[j - j0] = exp32(xblk[j - j0] - mn)")
                with em.loop("for j in range(j0, j1)", ("j",)):
                    w.line("p = xblk[j - j0]")
                    w.line("l += p")
                    accumulate("j", "p")
                w.line("lrow[r] += l")
                w.line("mrow[r] = mn")


def _row_buffer(em: Emitter, s_id: int, p_id: int, bidx, score, accumulate) -> None:
    """Scores of row i into the buffer `srow`, the row region's reductions over it, then P.V."""
    w = em.w
    with em.loop("for j in range(lim)", ("j",)):
        score("i", "j")
        w.line("srow[j] = s")
    em.overrides[s_id] = lambda ix: f"srow[{ix[-1]}]"
    with em.loop("for j2 in range(lim)", ("j2",)):
        w.line(f"pj = {em.value(p_id, bidx + ('i', 'j2'))}")
        accumulate("j2", "pj")
    del em.overrides[s_id]


def _softmax_operand(g, p_id: int):
    """(X, index map) when P = exp(X - amax(X)) / sum(exp(X - amax(X))) over the last axis, seen through
    reshapes (the index map takes an index of P to one of X), else None."""
    index = lambda ix: ix  # noqa: E731
    while g.nodes[p_id].op == "reshape":
        outer, src = g.nodes[p_id], g.nodes[g.nodes[p_id].args[0]]
        index = (lambda f, o, i: lambda ix: tuple(reshape_index(f(ix), o, i)))(index, outer.shape, src.shape)
        p_id = outer.args[0]
    p = g.nodes[p_id]
    if p.op != "div":
        return None
    e_id, total_id = p.args
    e, total = g.nodes[e_id], g.nodes[total_id]
    last = len(p.shape) - 1
    if e.op != "exp" or total.op != "sum" or total.args != (e_id,) or total.attr("axes") != (last,):
        return None
    sub = g.nodes[e.args[0]]
    if sub.op != "sub":
        return None
    x_id, mx_id = sub.args
    mx = g.nodes[mx_id]
    if mx.op != "amax" or mx.args != (x_id,) or mx.attr("axes") != (last,) or not mx.attr("keepdim"):
        return None
    return (x_id, index) if g.nodes[x_id].shape == p.shape else None


def _first_max_operand(g) -> int | None:
    """The operand of the row region's first max over the last axis (the masked, scaled scores)."""
    for n in g.nodes:
        if n.op == "amax" and n.attr("axes") == (len(n.shape) - 1,) and g.nodes[n.args[0]].dtype != "bool":
            return n.args[0]
    return None
