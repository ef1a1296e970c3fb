"""The online-softmax attention block with its two products as MKL GEMMs (`mkl.gemm_tile_mkl`, one
single-threaded call on the thread of the kernel's parallel loop, which runs one (batch, head) query block
per iteration).

Per key block: the block's query rows (packed once into `qbuf`) times the key block (packed into `kbuf`)
into the score tile `sblk`, the score expression X and the online softmax row by row over the tile (each
score replaced by its probability), then `sblk @ vbuf` added to the rows' outputs. Packing reads Q, K and
V through their views (grouped-query heads, concatenated past/new K/V): a copy of q + 2 kv rows per block,
small next to the q * kv * (D + Dv) multiply-adds it feeds.

Only the rows whose key limit reaches into the key block take part (causal prefill: the diagonal blocks
and below). Inside the rows' range, a key a row does not see weighs exactly 0 in the P.V product, so
0 * inf or nan gives nan there, as in eager (see `attention._scan_masked_values`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable


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


def block_max(em, s_id: int, softmax, read_score: Callable[[], None], store: str) -> None:
    """Row r's scores of keys j0..j1 (both online-softmax paths): per key, the score (emitted by
    `read_score` as `s`), the score expression X over it, stored to `store` and maxed into `mb`; then
    `m` the row's running max so far and `mn` the new one."""
    w = em.w
    x_id, x_index, bidx = softmax
    w.line("mb = np.float32(-np.inf)")
    with em.loop("for j in range(j0, j1)", ("j",)):
        read_score()
        em.overrides[s_id] = lambda ix: "s"
        w.line(f"x = {em.value(x_id, x_index(bidx + ('i', 'j')))}")
        del em.overrides[s_id]
        w.line(f"{store} = x")
        w.line("mb = max(mb, x)")
    w.line("m = mrow[r]")
    w.line("mn = max(m, mb)")


def rescale_row(em) -> None:
    """Row r's sum and output accumulator scaled from the old running max `m` to the new one `mn`."""
    w = em.w
    w.line("scale = exp32(m - mn)")
    w.line("lrow[r] = lrow[r] * scale")
    with em.loop("for e1 in range(oacc.shape[1])", ("e1",)):  # a loop, not `*= scale`:
        w.line("oacc[r, e1] *= scale")                       # that would be a parallel loop


def online_softmax_gemm(em, s_id: int, softmax, q_block: int, kv_block: int, depth: int, dv: int,
                        limit: Callable[[str], str], q_at, k_at, v_at) -> None:
    """The flash recurrence of `attention._online_softmax` with GEMM products. `q_at(i, d)`, `k_at(j, d)`
    and `v_at(j, e)` are expressions of Q[i, d], K[j, d] and V[j, e] of this block's (batch, head)."""
    w = em.w
    for name, shape in (("mrow", q_block), ("lrow", q_block), ("qbuf", (q_block, depth)),
                        ("kbuf", (kv_block, depth)), ("vbuf", (kv_block, dv)), ("sblk", (q_block, kv_block)),
                        ("pv", (q_block, dv))):
        w.line(f"{name} = np.empty({shape}, np.float32)")
        w.define(name)
    with start_rows(em, limit):
        with em.loop(f"for d in range({depth})", ("d",)):
            w.line(f"qbuf[r, d] = {q_at('i', 'd')}")
    with em.loop(f"for j0 in range(0, klim, {kv_block})", ("j0",)):
        w.line(f"jn = min(klim, j0 + {kv_block}) - j0")
        w.define("jn")
        with em.loop("for j in range(j0, j0 + jn)", ("j",)):
            with em.loop(f"for d in range({depth})", ("d",)):
                w.line(f"kbuf[j - j0, d] = {k_at('j', 'd')}")
            with em.loop(f"for e in range({dv})", ("e",)):
                w.line(f"vbuf[j - j0, e] = {v_at('j', 'e')}")
        w.line("rlo = i1")  # the rows that see a key of this block: [rlo, rhi)
        w.line("rhi = i0")
        with em.loop("for i in range(i0, i1)", ("i",)):
            with em.loop(f"if {limit('i')} > j0", barrier=True):
                w.line("rlo = min(rlo, i)")
                w.line("rhi = i + 1")
        with em.loop("if rlo < rhi", barrier=True):
            w.line("gemm_tile_mkl(qbuf[rlo - i0:rhi - i0], kbuf[:jn], sblk[rlo - i0:rhi - i0, :jn], True)")
            with em.loop("for i in range(rlo, rhi)", ("i",)):
                w.line("r = i - i0")
                w.define("r")
                w.line(f"j1 = max(j0, min({limit('i')}, j0 + jn))")
                w.define("j1")

                def read_score():
                    w.line("s = sblk[r, j - j0]")
                    w.define("s")  # the override of S reads it: what depends on S stays in this key loop
                block_max(em, s_id, softmax, read_score, "sblk[r, j - j0]")
                with em.loop("if mn > np.float32(-np.inf)", barrier=True):
                    rescale_row(em)
                    with em.loop("for j in range(j0, j1)", ("j",)):  # (no sum in it: it vectorizes)
                        w.line("sblk[r, j - j0] = exp32(sblk[r, j - j0] - mn)")
                    w.line("l = np.float32(0.0)")
                    with em.loop("for j in range(j0, j1)", ("j",)):
                        w.line("l += sblk[r, j - j0]")
                    w.line("lrow[r] += l")
                    w.line("mrow[r] = mn")
                with em.loop("else", barrier=True):  # every key so far masked: all weigh 0
                    with em.loop("for j in range(j0, j1)", ("j",)):
                        w.line("sblk[r, j - j0] = np.float32(0.0)")
                with em.loop("for j in range(j1, j0 + jn)", ("j",)):  # past the row's limit: weight 0
                    w.line("sblk[r, j - j0] = np.float32(0.0)")
            w.line("gemm_tile_mkl(sblk[rlo - i0:rhi - i0, :jn], vbuf[:jn], pv[rlo - i0:rhi - i0], False)")
            with em.loop("for r in range(rlo - i0, rhi - i0)", ("r",)):
                with em.loop(f"for e1 in range({dv})", ("e1",)):
                    w.line("oacc[r, e1] += pv[r, e1]")
