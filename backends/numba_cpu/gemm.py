"""The `matmul` kernel: row-wise prologue into an A tile, one BLAS GEMM per horizontally fused product,
then the epilogue read straight from the accumulators. The GEMM is MKL's (`mkl.py`) unless FUSEC_BLAS or a
torch without MKL says NumPy's OpenBLAS (`blas.gemm`); int8 and bf16 weights at prefill are widened to
float32 tiles by each thread for MKL's sgemm (`gemm_widen.py`; bf16 ones go to MKL's bf16 GEMM on a CPU
with bf16 products)."""
from __future__ import annotations

import math

from fusec.backends.numba_cpu import gemm_call, matvec_call
from fusec.backends.numba_cpu.expr import Emitter
from fusec.backends.numba_cpu.mkl import bf16_gemm_in_hardware, blas_choice
from fusec.backends.numba_cpu.stores import emit_store, shared_stores
from fusec.errors import FusecError
from fusec.symbolic import is_sym, lower, upper
from fusec.passes.weights import dequantized



def _array_view(em: Emitter, nid: int) -> tuple[str, bool, str] | None:
    """(array expression, transposed, stored format: "" or the kernels' suffix "_bf16"/"_int8") when node
    `nid` is a rank-2 view of an operand/weight array that BLAS (or the matrix-vector loop) can read in
    place: the array, its transpose, a reshape of a contiguous input, or a bfloat16 or int8 weight widened
    as it is read (`backends.numba_cpu.lowp`; never copied whole). An int8 weight's expression is its
    two arrays, "q, scales"."""
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
    stored = "_bf16" if widened else ""
    if nid in em.arrays:
        return em.arrays[nid], transposed, stored
    if n.op == "reshape" and n.args[0] in em.arrays and g.nodes[n.args[0]].op == "input" and not transposed:
        # K left to the array (-1): products equal but for K (the attention output's and the MLP's down
        # projection) then have one text, so one compiled kernel (`kernels.py`)
        return f"{em.arrays[n.args[0]]}.reshape(({n.shape[0]}, -1))", False, stored
    int8 = dequantized(g, n.args[0]) if n.op == "reshape" else None
    if int8 is not None and all(p in em.arrays for p in int8):
        return ", ".join(em.arrays[p] for p in int8), transposed, "_int8"
    return None


# bf16 weights where the CPU multiplies bf16 itself (`mkl.bf16_gemm_in_hardware`): from this many rows of A
# MKL's bf16 GEMM beats the matrix-vector loop, whatever the tiling pass's `matvec_rows` (64 for bf16: set
# where MKL emulates bf16). Measured on an Intel Xeon with AMX, the generator's tinyllama_1b bf16 prefill
# (one symbolic program, two alternating rounds): the loop 76-79 / 87-90 / 112-129 / 177-220 / 311-410 /
# 613-736 ms at 4 / 5 / 8 / 16 / 32 / 64 tokens, the GEMM from 5 rows 187-195 / 191-192 / 200-203 /
# 216-228 / 269-284 ms at 5 / 8 / 16 / 32 / 64 (its packing costs a short prompt more than the loop's reads).
BF16_GEMM_FROM = 17


def emit_matmul(em: Emitter, matmuls: list[int], outs: list[str], tiles: dict[str, int]) -> str:
    g, w = em.g, em.w
    # up to `matvec_rows` rows of A (the tiling pass's threshold) the weights stream through our parallel
    # loop instead of a BLAS call: at a few rows BLAS spends its time packing, and OpenBLAS's threads keep
    # spinning after a call and slow the parallel loops of the next kernels (measured: a 50 us attention
    # kernel took 5 ms after a 32-row sgemm), which only a large GEMM pays back
    matvec_rows, group = tiles["matvec_rows"], tiles["matvec_group"]  # group: weight rows a thread takes at once
    left = g.nodes[matmuls[0]].args[0]
    m, k = g.nodes[left].shape
    blas = blas_choice()[0]
    gemm_fn = "gemm_mkl" if blas == "mkl" else "gemm"
    # The prologue and epilogue run over parallel blocks of `rows` rows (the tiling pass's M-tiles). With
    # MKL the GEMM runs on the same Numba threads (`mkl.py`); NumPy's OpenBLAS runs it on threads of its
    # own, which keep spinning for a while after the call and would fight parallel loops of ours for the
    # cores: then the prologue and epilogue run on the calling thread (they are a few percent of the work).
    # Matrix-vector work is all ours. (A symbolic M counts at its upper bound; which product runs is then
    # chosen per call, below.)
    parallel = upper(m) <= matvec_rows or blas == "mkl"
    rows = tiles.get("rows", 0)
    rights = [_array_view(em, g.nodes[mm].args[1]) for mm in matmuls]
    _check_int8(g, matmuls, rights)
    if (blas == "mkl" and all(v is not None and v[1] and v[2] == "_bf16" for v in rights)
            and bf16_gemm_in_hardware()):
        matvec_rows = min(matvec_rows, BF16_GEMM_FROM - 1)
    # bf16 weights [N, K] at prefill on a CPU with bf16 products: a bf16 x bf16 -> f32 GEMM over A rounded
    # to bf16 (in the prologue); elsewhere the weights are widened per thread (`mkl.bf16_gemm_in_hardware`)
    bf16_gemm = lower(m) > matvec_rows and blas == "mkl" and bf16_gemm_in_hardware()
    bf16 = [bf16_gemm and v is not None and v[1] and v[2] == "_bf16" for v in rights]
    a = a16 = None
    if any(bf16):
        a16 = "abuf16"
        w.line(f"abuf16 = np.empty(({m}, {k}), np.uint16)")
        emit_store(em, left, a16, (m, k), parallel=parallel, block=rows, convert="bf16_bits")
    if not all(bf16):
        view = _array_view(em, left)
        if view is None or view[1] or view[2]:
            a = "abuf"
            w.line(f"abuf = np.empty(({m}, {k}), np.float32)")
            emit_store(em, left, a, (m, k), parallel=parallel, block=rows)  # the prologue, e.g. RMSNorm
        else:
            a = view[0]
    folded = _residual_gemm(em, matmuls, rights, outs, a) if blas == "mkl" and lower(m) > matvec_rows else None
    if folded:  # out = residual + a @ w^T: one call, no epilogue
        _emit_gemm(em, "gemm_add_mkl", folded)
        return "gemm"
    streamed: list[tuple[str, str, str]] = []  # (format, weight, product) of the matrix-vector products
    joint: list[tuple[str, str]] = []  # (weight [N, K], product) of the fp32 MKL GEMMs, run together
    widened_joint: list[tuple[str, str, str]] = []  # (format, weight, product): the same for bf16 / int8
    either = []  # the same for a symbolic M that may be matrix-vector sized (chosen per call)
    for j, mm in enumerate(matmuls):
        n = g.nodes[mm].shape[1]
        view = rights[j]
        if view is None or (view[2] and not view[1]):
            b, transposed, widened = f"bbuf{j}", False, ""
            w.line(f"{b} = np.empty(({k}, {n}), np.float32)")
            emit_store(em, g.nodes[mm].args[1], b, (k, n), parallel=parallel)
        else:
            b, transposed, widened = view
        direct = [k for k, o in enumerate(g.outputs) if o == mm]
        acc = outs[direct[0]] if direct else f"acc{j}"  # a product that is an output goes straight there
        if not direct:
            w.line(f"{acc} = np.empty(({m}, {n}), np.float32)")
        if not is_sym(m) and upper(m) <= matvec_rows and transposed:
            streamed.append((widened, b, acc))
        elif is_sym(m) and transposed and lower(m) <= matvec_rows and blas == "mkl":
            either.append((widened, b, acc))  # the product for the call's M, with the kernel's other such ones
        elif is_sym(m) and transposed and lower(m) <= matvec_rows:  # the product for the call's M
            with w.block(f"if {m} <= {matvec_rows}", barrier=True):
                _emit_matvecs(em, a, [(widened, b, acc)], group)
            with w.block("else", barrier=True):
                if widened:
                    w.line(f"gemm{widened}({a}, {b}, {acc})")
                else:
                    _emit_gemm(em, gemm_fn, f"{a}, {b}, {acc}, True")
        elif bf16[j]:
            _emit_gemm(em, "gemm_bf16_mkl", f"{a16}, {b}, {acc}")
        elif widened and blas == "mkl":
            widened_joint.append((widened, b, acc))
        elif widened:
            w.line(f"gemm{widened}({a}, {b}, {acc})")
        elif blas == "mkl" and transposed:
            joint.append((b, acc))
        else:
            _emit_gemm(em, gemm_fn, f"{a}, {b}, {acc}, {transposed}")
        em.overrides[mm] = (lambda name: lambda idx: f"{name}[{idx[0]}, {idx[1]}]")(acc)
    if either:  # matrix-vector products up to matvec_rows rows, else the GEMMs a fixed M would call
        with w.block(f"if {m} <= {matvec_rows}", barrier=True):
            _emit_matvecs(em, a, either, group)  # Q, K and V: one parallel loop
        with w.block("else", barrier=True):
            hardware = [(fmt, b, acc) for fmt, b, acc in either if fmt == "_bf16" and bf16_gemm_in_hardware()]
            if hardware:  # A rounded to bf16 once for all of them, as a fixed M's prologue does
                w.line(f"abuf16 = np.empty(({m}, {k}), np.uint16)")
                emit_store(em, left, "abuf16", (m, k), parallel=parallel, block=rows, convert="bf16_bits")
                for _, b, acc in hardware:
                    _emit_gemm(em, "gemm_bf16_mkl", f"abuf16, {b}, {acc}")
            _emit_joint_gemms(em, a, [(b, acc) for fmt, b, acc in either if not fmt])
            _emit_widened_gemms(em, a, [p for p in either if p[0] and p not in hardware])
    _emit_joint_gemms(em, a, joint)
    _emit_widened_gemms(em, a, widened_joint)
    _emit_matvecs(em, a, streamed, group)
    epilogue = [(o, out) for o, out in zip(g.outputs, outs) if o not in matmuls]
    # several outputs share one parallel loop when they can (`shared_stores`), else each has its own
    # (a symbolic M: blocks of `rows` rows at run time, at least one per thread)
    shared = parallel and 0 < rows < upper(m) and shared_stores(
        em, epilogue, f"max(threads(), ({m} + {rows - 1}) // {rows})" if is_sym(m) else -(-m // rows))
    for o, out in ([] if shared else epilogue):
        shape = g.nodes[o].shape
        # an output laid out otherwise (heads first, after a permute) has other outer rows: its blocks
        # hold as many elements as `rows` rows of the product (symbolic sizes: no row blocks)
        outer = 0 if is_sym(m) or any(is_sym(d) for d in shape) else max(1, math.prod(shape[:-1]))
        emit_store(em, o, out, shape, parallel=parallel, block=rows * max(1, outer // m) if outer else 0)
    return "gemm" if upper(m) > matvec_rows else "matvec"


def _residual_gemm(em: Emitter, matmuls: list[int], rights: list, outs: list[str], a: str | None) -> str:
    """The arguments of the call `gemm_add_mkl(a, w, out, residual)` when the kernel computes only out = residual + a @ w^T
    (either order of the add; the product possibly reshaped to the output's shape, rows flattened): a
    projection followed by the residual connection. MKL adds the product to a copy of the residual
    (`mkl.gemm_add_mkl`) instead of the product going to a buffer that a pass of its own then adds to the
    residual. '' when the kernel is anything else (its epilogue then runs as usual)."""
    g = em.g
    if len(matmuls) != 1 or len(g.outputs) != 1 or a is None:
        return ""
    mm, out = matmuls[0], g.nodes[g.outputs[0]]
    view = rights[0]
    if view is None or not view[1] or view[2] or mm in g.outputs:  # an fp32 weight [N, K], read in place
        return ""
    m, n = g.nodes[mm].shape
    shape = out.shape
    if out.op != "add" or out.dtype != "f32" or any(is_sym(d) for d in shape + (m, n)) or shape[-1:] != (n,):
        return ""

    def is_product(i: int) -> bool:
        x = g.nodes[i]
        if x.op == "reshape" and x.args[0] == mm and x.shape == shape:
            return True  # the rows of [M, N] as the output's leading axes (same last axis, row-major)
        return i == mm and shape == (m, n)

    x, y = out.args
    product, residual = (x, y) if is_product(x) else (y, x)
    r = g.nodes[residual]
    if not is_product(product) or r.op != "input" or r.shape != shape or r.dtype != "f32" \
            or residual not in em.arrays or math.prod(shape) != m * n:
        return ""

    def rows(name: str) -> str:
        return name if len(shape) == 2 else f"{name}.reshape(({m}, {n}))"
    return f"{a}, {view[0]}, {rows(outs[0])}, {rows(em.arrays[residual])}"


def _check_int8(g, matmuls: list[int], rights: list) -> None:
    """A matmul marked quantize="int8" (`passes.weights`) is only computed right by the int8 kernels,
    which quantize its activations: refuse to emit it any other way."""
    for mm, view in zip(matmuls, rights):
        if g.nodes[mm].attr("quantize") == "int8" and (view is None or view[2] != "_int8" or not view[1]):
            raise FusecError(f"matmul %{mm} reads an int8 weight (quantize=\"int8\") the numba backend does not "
                             f"see as its q and scales, so it cannot quantize the activations: expected "
                             f"x @ permute(reshape(cast(q) * scales)), given {g.nodes[g.nodes[mm].args[1]].op}")


MATVEC_GROUP = 3  # products run by one matrix-vector call at most (`matvec.matvec3`)


def _emit_joint_gemms(em: Emitter, a: str, joint: list[tuple[str, str]]) -> None:
    """The fp32 MKL GEMMs of one kernel, which all read `a`, in calls of up to three (Q, K and V; W1 and
    W3): each call one parallel loop over the columns of all its products (`mkl.gemm3_mkl`), so narrow
    products (K and V of grouped-query heads) are not split into narrower calls, nor each its own loop."""
    for i in range(0, len(joint), MATVEC_GROUP):
        group = joint[i:i + MATVEC_GROUP]
        if len(group) == 1:
            _emit_gemm(em, "gemm_mkl", f"{a}, {group[0][0]}, {group[0][1]}, True")
        else:
            _emit_gemm(em, f"gemm{len(group)}_mkl", f"{a}, {', '.join(f'{b}, {acc}' for b, acc in group)}")


WIDENED_GEMMS = {"_int8": "int8", "_bf16": "bf16w"}  # a weight format's GEMMs in `gemm_widen.py`


def _by_format(products: list[tuple[str, str, str]]):
    """(format, [(weight, product), ...]) of up to MATVEC_GROUP products of one weight format at a time, in
    order of the formats' first appearance: the calls that run them together."""
    for fmt in dict.fromkeys(f for f, _, _ in products):
        same = [(b, acc) for f, b, acc in products if f == fmt]
        for i in range(0, len(same), MATVEC_GROUP):
            yield fmt, same[i:i + MATVEC_GROUP]


def _emit_widened_gemms(em: Emitter, a: str, products: list[tuple[str, str, str]]) -> None:
    """The prefill GEMMs over bf16 or int8 weights of one kernel (format, weight, product), which all read
    `a`: those of one format in calls of up to three (`gemm_widen.gemm3_int8_mkl`, ...), each one parallel
    loop over the columns of all its products in which every thread widens its own weight tiles; the int8
    ones quantize `a` once per call."""
    for fmt, group in _by_format(products):
        arity = str(len(group)) if len(group) > 1 else ""
        _emit_gemm(em, f"gemm{arity}_{WIDENED_GEMMS[fmt]}_mkl", f"{a}, {', '.join(f'{b}, {acc}' for b, acc in group)}")


def _emit_matvecs(em: Emitter, a: str, streamed: list[tuple[str, str, str]], group: int) -> None:
    """The matrix-vector products of one kernel, which all read the activations `a`: those of one weight
    format in calls of up to three (Q, K and V; W1 and W3), each one parallel loop over the rows of all its
    matrices (`matvec.matvec2`, `lowp.matvec2_bf16`, ...), `group` weight rows at a time."""
    for fmt, products in _by_format(streamed):
        em.entries.append(matvec_call.key(fmt, len(products), group))  # its symbol, bound above the kernel
        em.w.line(f"{matvec_call.name(fmt, len(products))}({a}, {', '.join(b for b, _ in products)}, "
                  f"{', '.join(c for _, c in products)}, {group})")


def _emit_gemm(em: Emitter, name: str, args: str) -> None:
    """A call of `name` (an MKL GEMM, `gemm_call.py`, or NumPy's OpenBLAS `gemm`) with `args`, recording the
    entry of an MKL one so that its symbol is bound above the kernel."""
    if name in gemm_call.NAMES:
        em.entries.append(gemm_call.key(name))
    em.w.line(f"{name}({args})")
