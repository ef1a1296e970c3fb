"""A `loop` node (passes.loop) as one call into compiled code: a generated driver loops over the iterations
and calls the body's kernels from Numba, with no Python between kernels or layers.

    @njit(cache=True, nogil=True)
    def driver(x0, x1, x2, W0, W1, ..., c0, e0, chk, b0, b1, ..., o0, o1):
        o0[...] = x0                      # carried values live in the loop's outputs
        for l in range(trips):
            k0(o0, W0[l], W1[l], b0)      # iteration l's weights: a homogeneous tuple indexed by l
            k1(b0, x1, x2[l], b1)         # a sliced operand: row l, a C-contiguous view
            ...
            o1[l] = b1                    # a per-iteration output, stacked
            o0[...] = b3                  # the next carried value

The body's kernels are generated and cached like every kernel (`kernels.build`, one module per distinct
body); the driver is its own module, keyed by its text, which names the kernel modules it imports.
Intermediate buffers (`b*`) belong to the driver, allocated once. Weights are passed as one tuple per
body parameter (`args` rebuilds them when weights are rebound). Index checks of gathers run inside: a bad
index stops the driver with its number in `chk`, and `check` raises as a kernel call would.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from backends.numba_cpu.codegen import KernelCode
from backends.numba_cpu.kernels import build as build_kernels
from backends.numba_cpu.kernels import raise_bad_index
from fusec.dtypes import to_numpy
from fusec.errors import FusecError
from fusec.guards import take_index_checks
from fusec.ir import Graph, output_types

VIEWS = ("reshape", "slice")


@dataclass
class Driver:
    fn: object
    module: object
    modules: list            # the kernel modules it calls, then its own
    code: KernelCode          # readable name and source (no weights of its own: see `args`)
    weight_rows: tuple        # the loop's `weights`: per iteration, the names under iteration 0's
    consts: list = field(default_factory=list)     # stored constant arrays, in argument order
    errors: list = field(default_factory=list)     # (error slot, kernel code) per kernel that checks gathers
    checks: list = field(default_factory=list)     # (bound, what) per index check, numbered from 1
    buffers: list = field(default_factory=list)    # intermediate values of one iteration
    chk: np.ndarray = None

    def args(self, weights: dict) -> list:
        """The arguments after the loop's operands and before its outputs, for these weight arrays."""
        tuples = [tuple(weights[row[j]] for row in self.weight_rows) for j in range(len(self.weight_rows[0]))]
        return tuples + self.consts + [e for e, _ in self.errors] + [self.chk] + self.buffers

    def check(self) -> None:
        """Raise TakeIndexError for a bad index the last call found (as a kernel call would)."""
        raise_bad_index(self.chk, self.checks)
        for err, code in self.errors:
            raise_bad_index(err, code.gathers)


def build(graph: Graph, loop: int, header: str, load) -> Driver:
    """Generate and load the driver of loop node `loop` of `graph` (and the kernels of its body)."""
    n = graph.nodes[loop]
    body: Graph = n.attr("body")
    trips, carried, sliced = n.attr("trips"), list(n.attr("carried")), set(n.attr("sliced"))
    rows = n.attr("weights")
    kernels = [i for i, m in enumerate(body.nodes) if m.op == "kernel"]
    built = build_kernels(body, kernels, header, load)
    for i, m in enumerate(body.nodes):
        if m.op not in ("input", "kernel", "result") + VIEWS:
            raise FusecError(f"the numba backend runs loop bodies of kernels and views; %{i} of the body "
                             f"of loop %{loop} is a {m.op}")
    for o in body.outputs[:len(carried)]:
        if body.nodes[o].op == "input":
            raise FusecError(f"loop %{loop}: a carried value passed on unchanged is not supported by the "
                             "numba backend")
    d = Driver(None, None, [], None, rows, chk=np.zeros(2, np.int64))
    names: dict[int, str] = {}     # body id -> expression
    params = [f"x{k}" for k in range(len(n.args))] + [f"W{j}" for j in range(len(rows[0]))]
    lines: list[str] = []
    for k in carried:
        names[body.inputs[k]] = f"o{carried.index(k)}"
        lines.append(f"    o{carried.index(k)}[...] = x{k}")
    lines.append(f"    for l in range({trips}):")
    column = {name: j for j, name in enumerate(rows[0])}
    for k, i in enumerate(body.inputs):
        if k not in carried:
            names[i] = f"x{k}[l]" if k in sliced else f"x{k}"
    body_lines: list[str] = []
    for i, m in enumerate(body.nodes):
        if m.op == "reshape":
            body_lines.append(f"v{i} = {names[m.args[0]]}.reshape({_tuple(m.shape)})")
            names[i] = f"v{i}"
        elif m.op == "slice":
            from passes.hoist_slices import is_contiguous_slice
            if not is_contiguous_slice(m, body.nodes[m.args[0]].shape):
                raise FusecError(f"the numba backend runs contiguous slices in loop bodies; %{i} of the body "
                                 f"of loop %{loop} is not one")
            body_lines.append(f"v{i} = {names[m.args[0]]}.reshape(-1)[{_flat_slice(body, m)}]"
                              f".reshape({_tuple(m.shape)})")
            names[i] = f"v{i}"
        elif m.op == "result":
            names[i] = names[(m.args[0], m.attr("index"))]
        elif m.op == "kernel":
            code = built.codes[kernels.index(i)]
            for pos, bound, what in take_index_checks(m):
                d.checks.append((bound, what))
                body_lines.append(f"if not _indices_ok({names[m.args[pos]]}, {bound}, chk, {len(d.checks)}):")
                body_lines.append("    return")
            args = [names[a] for a in m.args] + [f"W{column[p]}[l]" for p in code.params]
            for key in code.consts:
                args.append(f"c{len(d.consts)}")
                d.consts.append(np.ascontiguousarray(body.tensors[key]))
            if code.gathers:
                args.append(f"e{len(d.errors)}")
                d.errors.append((np.zeros(2, np.int64), code))
            for r, t in enumerate(output_types(m)):
                name = f"b{len(d.buffers)}"
                d.buffers.append(np.empty(t.shape, to_numpy(t.dtype)))
                names[(i, r)] = name
                args.append(name)
            names[i] = names[(i, 0)]
            body_lines.append(f"k{kernels.index(i)}({', '.join(args)})")
            if code.gathers:
                body_lines.append(f"if e{len(d.errors) - 1}[0]:")
                body_lines.append("    return")
    nc = len(carried)
    for s, o in enumerate(body.outputs[nc:]):
        body_lines.append(f"o{nc + s}[l] = {names[o]}")
    for c, o in enumerate(body.outputs[:nc]):
        body_lines.append(f"o{c}[...] = {names[o]}")
    lines += ["        " + line for line in body_lines]
    params += ([f"c{k}" for k in range(len(d.consts))] + [f"e{k}" for k in range(len(d.errors))] + ["chk"] +
               [f"b{k}" for k in range(len(d.buffers))] + [f"o{k}" for k in range(len(output_types(n)))])
    imports = [f"from {built.modules[k].__name__} import kernel as k{k}" for k in range(len(kernels))]
    source = (header + "\n" + "\n".join(imports) + "\n\n\n" + INDICES_OK + "\n\n"
              f"# loop: {trips} iterations of {len(kernels)} kernels\n"
              "@njit(cache=True, nogil=True)\n"
              f"def driver({', '.join(params)}):\n" + "\n".join(lines) + "\n")
    d.module = load(source)
    d.fn = d.module.driver
    d.modules = list(built.distinct) + [d.module]
    d.code = KernelCode(f"loop{loop}", built.source + "\n\n" + source)
    return d


INDICES_OK = '''@njit(cache=True, nogil=True)
def _indices_ok(x, bound, chk, number):
    """False (the bad index and the check's number in chk) when an index lies outside [0, bound)."""
    for v in x.ravel():
        if v < 0 or v >= bound:
            chk[0] = number
            chk[1] = v
            return False
    return True
'''


def _tuple(shape: tuple[int, ...]) -> str:
    return "(" + "".join(f"{d}, " for d in shape) + ")"


def _flat_slice(body: Graph, m) -> str:
    """The flat range of a contiguous slice (passes.hoist_slices.is_contiguous_slice) of a C array."""
    shape = body.nodes[m.args[0]].shape
    axis, start = m.attr("axis"), m.attr("start")
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    return f"{start * inner}:{start * inner + m.type.numel}"
