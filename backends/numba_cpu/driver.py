"""A `loop` node (passes.loop) as one call into compiled code: a generated driver loops over the iterations
and calls the body's kernels from Numba, with no Python between kernels or layers.

    @njit(cache=True, nogil=True)
    def driver(x0, x1, x2, K, W0, W1, ..., P, c0, e0, chk, b0, b1, ..., o0, o1):
        _copy(o0, x0)                     # carried values live in the loop's outputs
        for l in range(trips):
            call_at(K[0], "<types>", o0, borrowed(W0, P[0, l]), borrowed(W1, P[1, l]), b0)   # (below)
            call_at(K[1], "<types>", b0, x1, x2[l], b1)   # a sliced operand: row l, a C-contiguous view
            ...
            _copy(o1[l], b1)              # a per-iteration output, stacked
            _copy(o0, b3)                 # the next carried value

The body's kernels are generated and cached like every kernel (`kernels.build`, one module per distinct
body); the driver is its own module, keyed by its text. It calls the kernels through their compiled
addresses: K holds the native entry point of each kernel's compiled specialization, and `call_at` calls
it with the argument types written beside it, checked when the driver compiles (`call_at.py`; first-class
function arguments cost ~0.15-0.2 ms per call to type and unbox in Python), so the driver's module neither types
nor links nor optimizes the kernels again. Importing them instead would link every kernel's code into the
driver's module, where LLVM optimizes and emits it a second time: the driver cost about as much to compile
as its kernels.
Intermediate buffers (`b*`) belong to the driver, allocated once. With symbolic sizes the driver takes
each size variable as an argument (`s0`, used by the body's reshapes and slices; the kernels read their
sizes from their arrays) and its buffers are planned for the upper bounds and passed as views at each
call's sizes (`resize`), so one compiled driver serves every size. Weights are passed as iteration 0's
array of each body parameter (its type and shape) and one int64 array P of the data addresses of every
iteration's (`args` rebuilds it when weights are rebound), from which `borrowed` makes iteration l's
array: a tuple of arrays per parameter cost seconds of LLVM time to unbox (`borrowed.py`). Index checks
of gathers run inside: a bad index stops the driver with its number in `chk`, and `check` raises as a
kernel call would; indices the loop does not change are checked once, before the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from fusec.backends.numba_cpu.call_at import entry_address, signature_text
from fusec.backends.numba_cpu.codegen import KernelCode
from fusec.backends.numba_cpu.compile_pool import array_type
from fusec.backends.numba_cpu.kernels import FUNCTION
from fusec.backends.numba_cpu.kernels import build as build_kernels
from fusec.backends.numba_cpu.kernels import raise_bad_index
from fusec.cache import recover
from fusec.dtypes import to_numpy
from fusec.errors import FusecError
from fusec.guards import take_index_checks
from fusec.ir import Graph, output_types
from fusec.passes.hoist_slices import is_contiguous_slice
from fusec.symbolic import evaluate

VIEWS = ("reshape", "slice")


@dataclass
class Driver:
    fn: object
    module: object
    modules: list            # the kernel modules it calls, then its own
    code: KernelCode          # readable name and source (no weights of its own: see `args`)
    weight_rows: tuple        # the loop's `weights`: per iteration, the names under iteration 0's
    calls: list = field(default_factory=list)      # per body kernel: (module, argument specs), see `kernels`
    texts: list = field(default_factory=list)      # per body kernel: its arguments' types, as in the source
    consts: list = field(default_factory=list)     # stored constant arrays, in argument order
    errors: list = field(default_factory=list)     # (error slot, kernel code) per kernel that checks gathers
    checks: list = field(default_factory=list)     # (bound, what) per index check, numbered from 1
    buffer_types: list = field(default_factory=list)  # IR types of the intermediate values of one iteration
    size_names: tuple = ()    # the graph's size variables, passed in this order
    buffers: list = field(default_factory=list)    # those values' arrays at the current sizes (`resize`)
    sizes: dict = field(default_factory=dict)
    chk: np.ndarray = None
    _storage: list = None
    _kernels: np.ndarray = None  # the kernels' entry points (`kernels`)
    _table: tuple = None      # (the weight arrays, their address table), see `_addresses`
    text: str = ""            # the driver's own module source (`benchtools.loop_kernel_seconds` edits it)

    def resize(self, sizes: dict) -> None:
        """Buffers at these sizes: views of storage planned once for the first sizes given (the upper
        bounds), so every view is a C-contiguous array of one Numba type."""
        shapes = [tuple(evaluate(d, sizes) for d in t.shape) for t in self.buffer_types]
        if self._storage is None:
            self._storage = [np.empty(shape, to_numpy(t.dtype)).reshape(-1)
                             for shape, t in zip(shapes, self.buffer_types)]
        self.buffers = [store[:int(np.prod(shape, dtype=np.int64))].reshape(shape)
                        for store, shape in zip(self._storage, shapes)]
        self.sizes = dict(sizes)

    def args(self, weights: dict) -> list:
        """The arguments after the loop's operands and before its outputs, for these weight arrays."""
        return [self.kernels(weights)] + self._data(weights)

    def _data(self, weights: dict) -> list:
        """The arguments after the kernels: iteration 0's weights, the address table of every iteration's,
        constants, slots and buffers."""
        first = [weights[name] for name in self.weight_rows[0]]
        return (first + [self._addresses(weights)] + self.consts + [e for e, _ in self.errors] + [self.chk] +
                [np.int64(self.sizes[name]) for name in self.size_names] + self.buffers)

    def _addresses(self, weights: dict) -> np.ndarray:
        """int64 [weights, iterations]: the data address of each iteration's weight, checked to have
        iteration 0's shape, strides and dtype (`borrowed` gives it those). Made again only when some
        array changed (a symbolic program's `resize` asks at every new size; `.ctypes` costs microseconds)."""
        arrays = [weights[name] for row in self.weight_rows for name in row]
        if self._table is not None and len(arrays) == len(self._table[0]) and all(
                a is b for a, b in zip(arrays, self._table[0])):
            return self._table[1]
        first = [weights[name] for name in self.weight_rows[0]]
        for row in self.weight_rows[1:]:
            for name, like in zip(row, first):
                w = weights[name]
                if (w.shape, w.strides, w.dtype) != (like.shape, like.strides, like.dtype):
                    raise FusecError(f"loop weight {name}: shape {list(w.shape)}, strides {w.strides}, "
                                     f"{w.dtype}; expected those of {list(like.shape)}, {like.strides}, "
                                     f"{like.dtype} (iteration 0's), as every iteration runs one kernel")
        addresses = np.array([[weights[row[j]].ctypes.data for row in self.weight_rows]
                              for j in range(len(first))], np.int64).reshape(len(first), len(self.weight_rows))
        self._table = (arrays, addresses)
        return addresses

    def signature(self, weights: dict, operands: list, outputs: list) -> tuple:
        """The driver's own Numba signature for these weights and the types of its operands and outputs,
        without compiling anything: the kernels are addresses, an int64 array."""
        kernels = numba.types.Array(numba.types.int64, 1, "C")
        return tuple(operands + [kernels] + [numba.typeof(x) for x in self._data(weights)] + outputs)

    def kernels(self, weights: dict) -> np.ndarray:
        """int64 [kernels]: the entry point of each body kernel compiled (or loaded from the cache) for the
        argument types the driver passes, C-contiguous arrays of the values' types and the weights' own,
        which must be the types written in the driver's source (the calls are checked against those)."""
        if self._kernels is None:
            addresses = []
            for (module, sig), text in zip(self.signatures(weights), self.texts):
                if signature_text(sig) != text:
                    raise FusecError(f"loop driver: a kernel would be called with ({signature_text(sig)}); "
                                     f"the driver was generated for ({text})")
                addresses.append(entry_address(_compiled(module, sig)))
            self._kernels = np.array(addresses, np.int64)
        return self._kernels

    def signatures(self, weights: dict) -> list:
        """[(kernel module, its Numba signature)] per body kernel, for these weight arrays."""
        first = self.weight_rows[0]
        return [(module, tuple(array_type(spec) if kind == "type" else
                               numba.typeof(weights[first[spec]] if kind == "weight" else spec)
                               for kind, spec in specs))
                for module, specs in self.calls]

    def check(self) -> None:
        """Raise TakeIndexError for a bad index the last call found (as a kernel call would)."""
        raise_bad_index(self.chk, self.checks)
        for err, code in self.errors:
            raise_bad_index(err, code.gathers)


def build(graph: Graph, loop: int, header: str, load, sizes: dict | None = None) -> Driver:
    """Generate and load the driver of loop node `loop` of `graph` (and the kernels of its body); its
    buffers are planned for `sizes` (the upper bounds of the graph's size variables)."""
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
    d = Driver(None, None, [], None, rows, chk=np.zeros(2, np.int64), size_names=tuple(sorted(graph.sizes)))
    names: dict[int, str] = {}     # body id -> expression
    weight_types = {p.attr("name"): p.type for i in kernels for p in body.nodes[i].attr("body").walk()
                    if p.op == "param"}  # iteration 0's weights: the kernels' params
    params = ([f"x{k}" for k in range(len(n.args))] + ["K"] +
              [f"W{j}" for j in range(len(rows[0]))] + ["P"])
    lines: list[str] = []
    for k in carried:
        names[body.inputs[k]] = f"o{carried.index(k)}"
        lines.append(f"    _copy(o{carried.index(k)}, x{k})")
    loop_line = f"    for l in range({trips}):"
    column = {name: j for j, name in enumerate(rows[0])}
    for k, i in enumerate(body.inputs):
        if k not in carried:
            names[i] = f"x{k}[l]" if k in sliced else f"x{k}"
    invariant = {f"x{k}" for k in range(len(n.args)) if k not in carried and k not in sliced}
    checked: set[tuple[str, int]] = set()
    body_lines: list[str] = []
    for i, m in enumerate(body.nodes):
        if m.op == "reshape":
            body_lines.append(f"v{i} = view({names[m.args[0]]}, 0, {_tuple(m.shape)})")
            names[i] = f"v{i}"
        elif m.op == "slice":
            if not is_contiguous_slice(m, body.nodes[m.args[0]].shape):
                raise FusecError(f"the numba backend runs contiguous slices in loop bodies; %{i} of the body "
                                 f"of loop %{loop} is not one")
            body_lines.append(f"v{i} = view({names[m.args[0]]}, {_flat_start(body, m)}, {_tuple(m.shape)})")
            names[i] = f"v{i}"
        elif m.op == "result":
            names[i] = names[(m.args[0], m.attr("index"))]
        elif m.op == "kernel":
            code = built.codes[kernels.index(i)]
            for pos, bound, what in take_index_checks(m):
                operand = names[m.args[pos]]
                if (operand, bound) in checked:
                    continue  # the same indices against the same bound: checked already
                checked.add((operand, bound))
                d.checks.append((bound, what))
                # indices the loop does not change (a driver input not sliced per iteration) are checked
                # once, before the loop; they stop the driver before any kernel runs, as at iteration 0
                into = lines if operand in invariant else body_lines
                indent = "    " if into is lines else ""
                into.append(f"{indent}if not _indices_ok({operand}, np.int64({bound}), chk, "
                            f"np.int64({len(d.checks)})):")
                into.append(f"{indent}    return")
            args = [names[a] for a in m.args] + [f"borrowed(W{column[p]}, P[{column[p]}, l])" for p in code.params]
            specs = [("type", body.nodes[a].type) for a in m.args] + [("weight", column[p]) for p in code.params]
            for key in code.consts:
                args.append(f"c{len(d.consts)}")
                d.consts.append(np.array(body.tensors[key], order="C"))  # writable: one type for every call
                specs.append(("array", d.consts[-1]))
            if code.gathers:
                args.append(f"e{len(d.errors)}")
                d.errors.append((np.zeros(2, np.int64), code))
                specs.append(("array", d.errors[-1][0]))
            for r, t in enumerate(output_types(m)):
                name = f"b{len(d.buffer_types)}"
                d.buffer_types.append(t)
                names[(i, r)] = name
                args.append(name)
                specs.append(("type", t))
            d.calls.append((built.modules[kernels.index(i)], specs))
            d.texts.append(signature_text(_weight_type(weight_types[rows[0][spec]]) if kind == "weight" else
                                          array_type(spec) if kind == "type" else numba.typeof(spec)
                                          for kind, spec in specs))
            names[i] = names[(i, 0)]
            body_lines.append(f"call_at(K[{kernels.index(i)}], \"{d.texts[-1]}\", {', '.join(args)})")
            if code.gathers:
                body_lines.append(f"if e{len(d.errors) - 1}[0]:")
                body_lines.append("    return")
    nc = len(carried)
    for s, o in enumerate(body.outputs[nc:]):
        body_lines.append(f"_copy(o{nc + s}[l], {names[o]})")
    for c, o in enumerate(body.outputs[:nc]):
        body_lines.append(f"_copy(o{c}, {names[o]})")
    lines += [loop_line] + ["        " + line for line in body_lines]
    params += ([f"c{k}" for k in range(len(d.consts))] + [f"e{k}" for k in range(len(d.errors))] + ["chk"] +
               list(d.size_names) + [f"b{k}" for k in range(len(d.buffer_types))] +
               [f"o{k}" for k in range(len(output_types(n)))])
    source = (header + "\n\n" + INDICES_OK + "\n\n"
              f"# loop: {trips} iterations of {len(kernels)} kernels\n"
              "@njit(cache=True, nogil=True)\n"
              f"def driver({', '.join(params)}):\n" + "\n".join(lines) + "\n")
    d.resize(sizes or {})
    d.module, d.text = load(source), source
    d.fn = d.module.driver
    d.modules = list(built.distinct) + [d.module]
    d.code = KernelCode(f"loop{loop}", built.source + "\n\n" + source)
    return d


def _weight_type(t):
    """The Numba type of the array the runtime passes for a weight of IR type `t` (`runtime._weight`: C-contiguous
    and writable; bfloat16 as its bits, uint16)."""
    if t.dtype == "bf16":
        return numba.types.Array(numba.types.uint16, len(t.shape), "C")
    return array_type(t)


def _compiled(module, sig: tuple):
    """The module's kernel compiled (or loaded from Numba's cache) for `sig`: its specialization.
    Cached code that fails to load is discarded and compiled again, as on a kernel's first call."""
    fn = getattr(module, FUNCTION)
    try:
        fn.compile(sig)
    except Exception as e:
        if not recover(module, FUNCTION, e):
            raise
        fn.compile(sig)
    return fn.overloads[sig]


# Helpers of every driver. Copies are loops rather than `dst[...] = src`: NumPy's broadcasting assignment
# brings its error path (a message formatted from the shapes), which alone took about half of a driver's
# cold compile. Bounds and check numbers are passed as int64, so one specialization serves every check.
INDICES_OK = '''from fusec.backends.numba_cpu.borrowed import borrowed, view
from fusec.backends.numba_cpu.call_at import call_at


@njit(cache=True, nogil=True)
def _copy(dst, src):
    """dst[...] = src for C-contiguous arrays of one size."""
    d = view(dst, 0, (dst.size,))
    s = view(src, 0, (src.size,))
    for i in range(d.size):
        d[i] = s[i]


@njit(cache=True, nogil=True)
def _indices_ok(x, bound, chk, number):
    """False (the bad index and the check's number in chk) when an index lies outside [0, bound). (`flat`,
    not `ravel`: ravel's general routine cost a driver's compile ~0.2 s more.)"""
    for v in x.flat:
        if v < 0 or v >= bound:
            chk[0] = number
            chk[1] = v
            return False
    return True
'''


def _tuple(shape: tuple[int, ...]) -> str:
    return "(" + "".join(f"{d}, " for d in shape) + ")"


def _flat_start(body: Graph, m) -> str:
    """The flat offset of a contiguous slice (passes.hoist_slices.is_contiguous_slice) of a C array."""
    shape = body.nodes[m.args[0]].shape
    axis, start = m.attr("axis"), m.attr("start")
    inner = 1
    for d in shape[axis + 1:]:
        inner *= d  # an int, or a Sym whose text is an expression of the size arguments
    return f"{start * inner}"
