"""The `matmul` kernel: row-wise prologue into an A tile, one BLAS GEMM per horizontally fused product,
then the epilogue read straight from the accumulators while they are in cache."""
from __future__ import annotations

from backends.numba_cpu.codegen import emit_outputs, emit_store
from backends.numba_cpu.expr import Emitter
from fusec.symbolic import is_sym, lower, upper

MATVEC_ROWS = 64  # up to this many rows of A, stream the weights in our parallel loop instead of calling BLAS:
# BLAS threads keep spinning after a call and slow the parallel loops of the next kernels (measured: a
# 50 us attention kernel took 5 ms after a 32-row sgemm), which only a large GEMM pays back


def _array_view(em: Emitter, nid: int) -> tuple[str, bool, bool] | None:
    """(array expression, transposed, bf16) when node `nid` is a rank-2 view of an operand/weight array
    that BLAS (or the matrix-vector loop) can read in place: the array, its transpose, a reshape of a
    contiguous input, or a bfloat16 weight widened by a cast (widened on the fly, never copied whole)."""
    g = em.g
    n = g.nodes[nid]
    transposed = False
    if n.op == "permute" and n.attr("perm") == (1, 0):
        transposed, nid, n = True, n.args[0], g.nodes[n.args[0]]
    # only a weight holds bf16 as its bits (uint16); a bf16 activation is float32 already (`fusec.dtypes`)
    widened = (n.op == "cast" and n.dtype == "f32" and g.nodes[n.args[0]].dtype == "bf16"
               and g.nodes[n.args[0]].op == "param")
    if widened:
        nid, n = n.args[0], g.nodes[n.args[0]]
    if nid in em.arrays:
        return em.arrays[nid], transposed, widened
    if n.op == "reshape" and n.args[0] in em.arrays and g.nodes[n.args[0]].op == "input" and not transposed:
        return f"{em.arrays[n.args[0]]}.reshape(({n.shape[0]}, {n.shape[1]}))", False, widened
    return None


def emit_matmul(em: Emitter, matmuls: list[int], outs: list[str]) -> str:
    g, w = em.g, em.w
    left = g.nodes[matmuls[0]].args[0]
    m, k = g.nodes[left].shape
    # BLAS runs the GEMM on its own threads, which keep spinning for a while after the call; parallel
    # loops of ours around it would fight them for the cores, so the prologue and epilogue of a GEMM
    # run on the calling thread (they are a few percent of its work). Matrix-vector work is all ours.
    # (a symbolic M counts at its upper bound; which product runs is then chosen per call, below)
    parallel = upper(m) <= MATVEC_ROWS
    view = _array_view(em, left)
    if view is None or view[1] or view[2]:
        a = "abuf"
        w.line(f"abuf = np.empty(({m}, {k}), np.float32)")
        emit_store(em, left, a, (m, k), parallel=parallel)  # the prologue, e.g. RMSNorm
    else:
        a = view[0]
    for j, mm in enumerate(matmuls):
        right = g.nodes[mm].args[1]
        n = g.nodes[mm].shape[1]
        view = _array_view(em, right)
        if view is None or (view[2] and not view[1]):
            b, transposed, widened = f"bbuf{j}", False, False
            w.line(f"{b} = np.empty(({k}, {n}), np.float32)")
            emit_store(em, right, b, (k, n), parallel=parallel)
        else:
            b, transposed, widened = view
        direct = [k for k, o in enumerate(g.outputs) if o == mm]
        acc = outs[direct[0]] if direct else f"acc{j}"  # a product that is an output goes straight there
        if not direct:
            w.line(f"{acc} = np.empty(({m}, {n}), np.float32)")
        if is_sym(m) and transposed and lower(m) <= MATVEC_ROWS:  # the product for the call's M
            with w.block(f"if {m} <= {MATVEC_ROWS}", barrier=True):
                w.line(f"matvec{'_bf16' if widened else ''}({a}, {b}, {acc})")
            with w.block("else", barrier=True):
                w.line(f"gemm_bf16({a}, {b}, {acc})" if widened else f"gemm({a}, {b}, {acc}, True)")
        elif upper(m) <= MATVEC_ROWS and transposed:
            w.line(f"matvec{'_bf16' if widened else ''}({a}, {b}, {acc})")
        elif widened:
            w.line(f"gemm_bf16({a}, {b}, {acc})")
        else:
            w.line(f"gemm({a}, {b}, {acc}, {transposed})")
        em.overrides[mm] = (lambda name: lambda idx: f"{name}[{idx[0]}, {idx[1]}]")(acc)
    written = {k for k, o in enumerate(g.outputs) if o in matmuls}
    emit_outputs(em, outs, only=[k for k in range(len(outs)) if k not in written], parallel=parallel)
    return "gemm" if upper(m) > MATVEC_ROWS else "matvec"
