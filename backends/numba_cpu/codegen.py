"""Numba source for one kernel node: a loop nest per kind, with the body's scalar code from `Emitter`.

Every generated function has the signature `kNAME(a0.., w0.., c0.., [kerr,] o0..)`: activation operands,
weights (params), stored constants, the error slot of a kernel that checks gather indices itself, then the
output buffers it fills. Names are the compiler's own; the names of
the user's module only appear in the `# weights:` comment line.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fusec.backends.numba_cpu.attention import emit_attention
from fusec.backends.numba_cpu.expr import Emitter
from fusec.backends.numba_cpu.gemm import emit_matmul
from fusec.backends.numba_cpu.entries import binding_lines
from fusec.backends.numba_cpu.sizes import size_lines
from fusec.backends.numba_cpu.stores import emit_outputs, emit_rows
from fusec.backends.numba_cpu.writer import Writer
from fusec.errors import FusecError
from fusec.guards import describe_take, take_bound
from fusec.ir import Graph, Node

REDUCE_OPS = ("sum", "amax", "amin", "argmax")


@dataclass
class KernelCode:
    name: str
    source: str
    params: list[str] = field(default_factory=list)   # outer tensor names, in argument order
    consts: list[str] = field(default_factory=list)
    loop: str = ""                                     # the loop nest used, for stats and dumps
    gathers: list[tuple[int, str]] = field(default_factory=list)  # (bound, what) of each take it checks
    # (`kerr` is then its argument after the constants)


def generate(name: str, node: Node) -> KernelCode:
    """Numba source of kernel `node` (op `kernel`), as a function called `name`."""
    body: Graph = node.attr("body")
    if any(n.dtype == "f16" for n in body.nodes):
        raise FusecError("the numba backend has no float16 arithmetic; use backend='reference' or float32")
    w = Writer()
    arrays, params, consts = {}, [], []
    inputs = body.inputs
    for k, i in enumerate(inputs):
        arrays[i] = f"a{k}"
    for i, n in enumerate(body.nodes):
        if n.op == "param":
            arrays[i] = f"w{len(params)}"
            params.append(n.attr("name"))
        elif n.op == "const" and n.attr("key") is not None:
            arrays[i] = f"c{len(consts)}"
            consts.append(n.attr("key"))
    outs = [f"o{k}" for k in range(len(body.outputs))]
    tiles = dict(node.attr("tiles") or ())
    em = Emitter(body, w, arrays, tiles=tiles)
    # [gather number + 1, bad index] of a computed index out of range (`checked_index`): an array the
    # program owns and passes after the constants (allocating it per call costs more than the check)
    kerr = ["kerr"] if em.gathers else []
    args = ([f"a{k}" for k in range(len(inputs))] + [f"w{k}" for k in range(len(params))] +
            [f"c{k}" for k in range(len(consts))] + kerr + outs)
    kind = node.attr("kind")
    w.line(f"# kernel {name}: kind={kind}")
    if params:
        w.line("# weights: " + ", ".join(f"w{k}={p}" for k, p in enumerate(params)))
    # error_model="numpy": x / 0 is inf or nan as in torch, not a ZeroDivisionError
    w.line('@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)')
    with w.block(f"def {name}({', '.join(args)})", barrier=True):  # nothing hoists out of the function
        if body.sizes:  # symbolic sizes: read from the arrays at run time (`sizes.size_lines`)
            for var, line in size_lines(body, [f"a{k}" for k in range(len(inputs))], outs):
                w.line(line)
                w.define(var)
        matmuls = [i for i, n in enumerate(body.nodes) if n.op == "matmul"]
        anchors = node.attr("anchors") or ()
        # a bf16 attention runs the generic loops, which round every op to bf16 as eager does (the
        # flash loop keeps its scores and running sums in float32)
        if kind == "attention" and len(anchors) == 2 and all(body.nodes[a].dtype == "f32" for a in anchors):
            loop = emit_attention(em, anchors, outs, em.tiles)
        elif matmuls and _is_gemm(body, matmuls):
            loop = emit_matmul(em, matmuls, outs, em.tiles)
        elif any(n.op in REDUCE_OPS for n in body.nodes):
            loop = emit_rows(em, outs)
        else:
            loop = "pointwise"
            emit_outputs(em, outs)
    source = w.text()
    if "prange(" not in source:  # a kernel of small loops runs on the calling thread: say so to Numba
        source = source.replace("@njit(parallel=True,", "@njit(parallel=False,", 1)
    # the library entries its calls declare (recorded by the emitter), bound before it compiles or loads
    source = binding_lines(em.entries, source) + source
    gathers = [(take_bound(body, body.nodes[i]), describe_take(body, body.nodes[i])) for i in em.gathers]
    return KernelCode(name, source, params, consts, loop, gathers)


def _is_gemm(body: Graph, matmuls: list[int]) -> bool:
    """Rank-2 float32 matmuls sharing their left operand: the BLAS path (others run as scalar loops)."""
    lefts = {body.nodes[m].args[0] for m in matmuls}
    return (len(lefts) == 1 and all(body.nodes[m].dtype == "f32" for m in matmuls)
            and all(len(body.nodes[a].shape) == 2 for m in matmuls for a in body.nodes[m].args))
