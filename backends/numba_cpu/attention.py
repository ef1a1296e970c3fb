"""The `attention` kernel: for each query row, the score row S[i, :] = q_i . K^T is computed into a
row buffer (an on-chip buffer on the RDU), the row region (scale, mask, softmax) runs over it with its
reductions computed once per row, and P[i, :] . V accumulates into the output row. Q, K and V are read
through their views: grouped-query heads and concatenated past/new K/V are index arithmetic."""
from __future__ import annotations

from backends.numba_cpu.codegen import PARALLEL_MIN_ELEMENTS, emit_outputs
from backends.numba_cpu.expr import Emitter, _broadcast


def emit_attention(em: Emitter, anchors: tuple[int, int], outs: list[str]) -> str:
    g, w = em.g, em.w
    s_id, o_id = anchors
    qv, kv = g.nodes[s_id].args
    p_id, vv = g.nodes[o_id].args
    s_shape, o_shape = g.nodes[s_id].shape, g.nodes[o_id].shape
    batch, tq, tk = s_shape[:-2], s_shape[-2], s_shape[-1]
    depth, dv = g.nodes[qv].shape[-1], o_shape[-1]
    rows = tq
    for d in batch:
        rows *= d
    w.line(f"obuf = np.empty(({', '.join(str(d) for d in o_shape)},), np.float32)")
    parallel = rows * tk * (depth + dv) >= PARALLEL_MIN_ELEMENTS * 4
    with em.loop(f"for row in {'prange' if parallel else 'range'}({rows})", ("row",)):
        idx = []
        rest = rows
        for d in list(batch) + [tq]:
            rest //= d
            var = em.tmp("b")
            w.line(f"{var} = (row // {rest}) % {d}" if rest > 1 else f"{var} = row % {d}")
            w.var_level[var] = w.depth
            idx.append(var)
        bidx, i = tuple(idx[:-1]), idx[-1]
        w.line(f"srow = np.empty({tk}, np.float32)")
        with em.loop(f"for j in range({tk})", ("j",)):
            w.line("s = np.float32(0.0)")
            with em.loop(f"for d in range({depth})", ("d",)):
                q = em.value(qv, _broadcast(bidx, g.nodes[qv].shape[:-2]) + (i, "d"))
                k = em.value(kv, _broadcast(bidx, g.nodes[kv].shape[:-2]) + ("d", "j"))
                w.line(f"s += {q} * {k}")
            w.line("srow[j] = s")
        em.overrides[s_id] = lambda ix: f"srow[{ix[-1]}]"
        w.line(f"prow = np.empty({tk}, np.float32)")
        with em.loop(f"for j2 in range({tk})", ("j2",)):
            w.line(f"prow[j2] = {em.value(p_id, bidx + (i, 'j2'))}")
        # not np.zeros: under parallel=True Numba turns it into a parallel loop of its own, launched per row
        w.line(f"orow = np.empty({dv}, np.float32)")
        with em.loop(f"for e0 in range({dv})", ("e0",)):
            w.line("orow[e0] = np.float32(0.0)")
        with em.loop(f"for j3 in range({tk})", ("j3",)):
            w.line("pj = prow[j3]")
            with em.loop(f"for e in range({dv})", ("e",)):
                v = em.value(vv, _broadcast(bidx, g.nodes[vv].shape[:-2]) + ("j3", "e"))
                w.line(f"orow[e] += pj * {v}")
        with em.loop(f"for e2 in range({dv})", ("e2",)):
            w.line(f"obuf[{', '.join(bidx + (i, 'e2'))}] = orow[e2]")
    em.overrides[o_id] = lambda ix: f"obuf[{', '.join(ix)}]"
    emit_outputs(em, outs)
    return "attention"
