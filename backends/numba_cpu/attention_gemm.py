"""The online-softmax attention block with its two products as MKL GEMMs (`mkl.gemm_tile_mkl`, one
single-threaded call on the thread of the kernel's parallel loop, which runs one (batch, head) query block
per iteration).

Per key block: the block's query rows (packed once into `qbuf`) times the key block (packed into `kbuf`)
into the score tile `sblk`, the score expression X and the online softmax row by row over the tile (each
score replaced by its probability), then `sblk @ vbuf` added to the rows' outputs. Packing reads Q, K and
V through their views (grouped-query heads, concatenated past/new K/V): a copy of q + 2 kv rows per block,
small next to the q * kv * (D + Dv) multiply-adds it feeds; K and V rows that lie in one array, key after
key, are read in place (`_in_place`), so grouped-query heads do not copy the same rows once per head.

Only the rows whose key limit reaches into the key block take part (causal prefill: the diagonal blocks
and below). Inside the rows' range, a key a row does not see weighs exactly 0 in the P.V product, so
0 * inf or nan gives nan there, as in eager (see `attention._scan_masked_values`).

A row's max and sum over its scores run in `LANES` partial results (`_lane_reduce`): a max or a sum of
one accumulator is a chain LLVM does not vectorize (floating-point sums are not reassociated), lanes are
one vector register each; with the causal mask no longer read in the key loop (`block_max`) the loops
over a row's scores then all vectorize (a tenth of the prefill attention's time, measured at one thread).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

from fusec.backends.numba_cpu.attention_mask import key_limit


@contextmanager
def start_rows(em, limit: Callable[[str], str]):
    """The rows i0..i1 of a query block before its key blocks (both online-softmax paths): each row's
    running max `mrow[r]` and sum `lrow[r]` reset, its output accumulator zeroed, and `klim` the largest
    key limit of the rows. Lines emitted inside the `with` run per row too (the GEMM path packs Q)."""
    w = em.w
    w.line("klim = 0")
    with em.loop("for i in range(i0, i1)", ("i",)):
        w.line("r = i - i0")
        w.define("r")
        w.line(f"klim = max(klim, {limit('i')})")
        w.line("mrow[r] = np.float32(-np.inf)")
        w.line("lrow[r] = np.float32(0.0)")
        with em.loop("for e0 in range(oacc.shape[1])", ("e0",)):
            w.line("oacc[r, e0] = np.float32(0.0)")
        yield


def block_max(em, s_id: int, softmax, read_score: Callable[[], None], store: str, row: Callable[[str], str] | None = None) -> None:
    """Row r's scores of keys j0..j1 (both online-softmax paths): per key, the score (emitted by
    `read_score` as `s`), the score expression X over it, stored to `store` and maxed into `mb`; then
    `m` the row's running max so far and `mn` the new one. With `row` (the stored row's element at an
    index j - j0) the max is taken afterwards over the row in lanes (`_lane_reduce`), not key by key.

    The key loop stops at the row's key limit; when that limit is a constant causal mask's, the mask is
    False at every key it reaches, so it is not read there (a load and a select per score, and the loop
    would not vectorize)."""
    w = em.w
    x_id, x_index, bidx = softmax
    unmasked = _causal_condition(em, x_id, x_index(bidx + ("i", "0")))
    if not row:
        w.line("mb = np.float32(-np.inf)")
    with em.loop("for j in range(j0, j1)", ("j",)):
        read_score()
        em.overrides[s_id] = lambda ix: "s"
        if unmasked is not None:
            em.overrides[unmasked] = lambda ix: "False"
        w.line(f"x = {em.value(x_id, x_index(bidx + ('i', 'j')))}")
        em.overrides.pop(unmasked, None)
        del em.overrides[s_id]
        w.line(f"{store} = x")
        if not row:
            w.line("mb = max(mb, x)")
    if row:
        _lane_reduce(em, row, "mb", "np.float32(-np.inf)", lambda acc, x: f"max({acc}, {x})")
    w.line("m = mrow[r]")
    w.line("mn = max(m, mb)")


ROW = "sblk[r, {}]".format  # row r of the score tile, at an index
LANES = 16  # partial results of a row's max and sum: one AVX-512 register of float32 (two AVX2 ones)


def _lane_reduce(em, row: Callable[[str], str], out: str, init: str, combine: Callable[[str, str], str]) -> None:
    """`out` = the reduction by `combine` of row(0) .. row(j1 - j0 - 1) (a row of a score tile),
    in LANES partial results (`lane`, a buffer of the block) folded at the end, then the tail. The order
    differs from one accumulator's: a sum rounds differently (as any vectorized sum does, eager's too), a
    max is the same; a NaN score is skipped by `max` either way and makes the row NaN through exp."""
    w = em.w
    w.line(f"jv = j0 + (j1 - j0) // {LANES} * {LANES}")
    w.define("jv")
    with em.loop(f"for u in range({LANES})", ("u",)):
        w.line(f"lane[u] = {init}")
    with em.loop(f"for jb in range(j0, jv, {LANES})", ("jb",)):
        with em.loop(f"for u in range({LANES})", ("u",)):
            w.line(f"lane[u] = {combine('lane[u]', row('jb - j0 + u'))}")
    w.line(f"{out} = {init}")
    with em.loop(f"for u in range({LANES})", ("u",)):
        w.line(f"{out} = {combine(out, 'lane[u]')}")
    with em.loop("for j in range(jv, j1)", ("j",)):
        w.line(f"{out} = {combine(out, row('j - j0'))}")


def _causal_condition(em, x_id: int, row_idx: tuple[str, ...]) -> int | None:
    """The condition node of X = where(mask, -inf, ...) when the mask is a constant causal one, the key
    limit (`attention_mask.key_limit`) is taken from it, and so it is False at every key below the limit;
    else None."""
    x = em.g.nodes[x_id]
    if x.op != "where" or em.g.nodes[x.args[0]].op != "const" or key_limit(em, x_id, row_idx) is None:
        return None
    return x.args[0]


def rescale_row(em) -> None:
    """Row r's sum and output accumulator scaled from the old running max `m` to the new one `mn`."""
    w = em.w
    w.line("scale = exp32(m - mn)")
    w.line("lrow[r] = lrow[r] * scale")
    with em.loop("for e1 in range(oacc.shape[1])", ("e1",)):  # a loop, not `*= scale`:
        w.line("oacc[r, e1] *= scale")                       # that would be a parallel loop


KEY = "jkey"  # a placeholder for the key index when asking where a key's row lies


def _in_place(row_of: Callable[[str], object] | None, span: str = "j0:j0 + jn") -> str:
    """The key block's rows [j0, j0 + jn) (or those of `span`) of K or V as a slice of its operand array,
    `aN[..., j0:j0 + jn]`, when `row_of(j)` (`attention_rows.array_row` of the row of key j) says the row
    is the last axis of one array and the key its axis before: the GEMM then reads them in place (unit stride along the row, any
    stride between rows), not through a packed copy. '' otherwise (a choice per key, a key axis
    elsewhere, an index computed from the key)."""
    row = row_of(KEY) if row_of is not None else None
    if not row or row[0] != "row" or row[2].count(KEY) != 1:
        return ""
    lead, _, last = row[2].rpartition(", ")
    if last.strip("()") != KEY or last.count("(") != last.count(")"):  # the key itself, parenthesized
        return ""
    return f"{row[1]}[{lead + ', ' if lead else ''}{span}]"


def online_softmax_gemm(em, s_id: int, softmax, q_block: int, kv_block: int, depth: int, dv: int,
                        limit: Callable[[str], str], q_at, k_at, v_at, k_row=None, v_row=None) -> None:
    """The flash recurrence of `attention._online_softmax` with GEMM products. `q_at(i, d)`, `k_at(j, d)`
    and `v_at(j, e)` are expressions of Q[i, d], K[j, d] and V[j, e] of this block's (batch, head);
    `k_row(j)` and `v_row(j)`, where the rows of K and V lie (`_in_place`: a key block read in place
    instead of packed: grouped-query heads would copy the same rows once per head)."""
    w = em.w
    k_in, v_in = _in_place(k_row), _in_place(v_row)
    for name, shape in (("mrow", q_block), ("lrow", q_block), ("qbuf", (q_block, depth)),
                        ("kbuf", (kv_block, depth)), ("vbuf", (kv_block, dv)), ("sblk", (q_block, kv_block)),
                        ("pv", (q_block, dv)), ("lane", LANES)):
        if (name == "kbuf" and k_in) or (name == "vbuf" and v_in):
            continue
        w.line(f"{name} = np.empty({shape}, np.float32)")
        w.define(name)
    with start_rows(em, limit):
        with em.loop(f"for d in range({depth})", ("d",)):
            w.line(f"qbuf[r, d] = {q_at('i', 'd')}")
    with em.loop(f"for j0 in range(0, klim, {kv_block})", ("j0",)):
        w.line(f"jn = min(klim, j0 + {kv_block}) - j0")
        w.define("jn")
        if not (k_in and v_in):
            with em.loop("for j in range(j0, j0 + jn)", ("j",)):
                if not k_in:
                    with em.loop(f"for d in range({depth})", ("d",)):
                        w.line(f"kbuf[j - j0, d] = {k_at('j', 'd')}")
                if not v_in:
                    with em.loop(f"for e in range({dv})", ("e",)):
                        w.line(f"vbuf[j - j0, e] = {v_at('j', 'e')}")
        for name, block in (("kblk", k_in or "kbuf[:jn]"), ("vblk", v_in or "vbuf[:jn]")):
            w.line(f"{name} = {block}")
            w.define(name)
        w.line("rlo = i1")  # the rows that see a key of this block: [rlo, rhi)
        w.line("rhi = i0")
        with em.loop("for i in range(i0, i1)", ("i",)):
            with em.loop(f"if {limit('i')} > j0", barrier=True):
                w.line("rlo = min(rlo, i)")
                w.line("rhi = i + 1")
        with em.loop("if rlo < rhi", barrier=True):
            w.line("gemm_tile_mkl(qbuf[rlo - i0:rhi - i0], kblk, sblk[rlo - i0:rhi - i0, :jn], True)")
            with em.loop("for i in range(rlo, rhi)", ("i",)):
                w.line("r = i - i0")
                w.define("r")
                w.line(f"j1 = max(j0, min({limit('i')}, j0 + jn))")
                w.define("j1")

                def read_score():
                    w.line("s = sblk[r, j - j0]")
                    w.define("s")  # the override of S reads it: what depends on S stays in this key loop
                block_max(em, s_id, softmax, read_score, "sblk[r, j - j0]", ROW)
                with em.loop("if mn > np.float32(-np.inf)", barrier=True):
                    rescale_row(em)
                    with em.loop("for j in range(j0, j1)", ("j",)):  # (no sum in it: it vectorizes)
                        w.line("sblk[r, j - j0] = exp32(sblk[r, j - j0] - mn)")
                    _lane_reduce(em, ROW, "l", "np.float32(0.0)", lambda acc, x: f"{acc} + {x}")
                    w.line("lrow[r] += l")
                    w.line("mrow[r] = mn")
                with em.loop("else", barrier=True):  # every key so far masked: all weigh 0
                    with em.loop("for j in range(j0, j1)", ("j",)):
                        w.line("sblk[r, j - j0] = np.float32(0.0)")
                with em.loop("for j in range(j1, j0 + jn)", ("j",)):  # past the row's limit: weight 0
                    w.line("sblk[r, j - j0] = np.float32(0.0)")
            w.line("gemm_tile_mkl(sblk[rlo - i0:rhi - i0, :jn], vblk, pv[rlo - i0:rhi - i0], False)")
            with em.loop("for r in range(rlo - i0, rhi - i0)", ("r",)):
                with em.loop(f"for e1 in range({dv})", ("e1",)):
                    w.line("oacc[r, e1] += pv[r, e1]")
