"""fusec IR: a graph of immutable nodes over a small set of primitive ops.

A `Graph` is plain data: a tuple of `Node`s in topological order, where a node refers to its operands by
their position in that tuple, plus the ids of the outputs. Weights are `param` nodes naming an entry of
`Graph.tensors` (the module's own tensors, never copied); folded constants are `const` nodes, either a
splat (`value=`, any shape) or a stored array (`key=` into `Graph.tensors`).

Graphs are built through `Builder`, which hash-conses nodes (an identical node is created once, so common
subexpressions are shared by construction) and infers each node's type from its operands (`opset.infer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from fusec.errors import IRError

DTYPES = ("f32", "f64", "f16", "bf16", "i64", "i32", "i16", "i8", "u8", "bool")
FLOAT_DTYPES = ("f32", "f64", "f16", "bf16")


@dataclass(frozen=True)
class TensorType:
    """Shape and element type of a value. A dimension is an int or a `fusec.symbolic.Sym`, a size known at
    run time (a polynomial in named size variables with bounds, e.g. the sequence length `s0`)."""

    shape: tuple[Any, ...]
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise IRError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"


def dtype_size(dtype: str) -> int:
    return {"f64": 8, "i64": 8, "f32": 4, "i32": 4, "f16": 2, "bf16": 2, "i16": 2}.get(dtype, 1)


Attrs = tuple[tuple[str, Any], ...]


def make_attrs(attrs: Mapping[str, Any]) -> Attrs:
    """Attributes as a sorted tuple of pairs, with lists turned into tuples so nodes stay hashable."""
    def freeze(v):
        return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v
    return tuple(sorted((k, freeze(v)) for k, v in attrs.items()))


@dataclass(frozen=True)
class Node:
    """One op application. `args` are ids (positions) of earlier nodes in the same graph."""

    op: str
    args: tuple[int, ...]
    attrs: Attrs
    type: TensorType
    origin: str = field(default="", compare=False)  # where it came from in the user's code, for errors

    def attr(self, name: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == name:
                return v
        return default

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype


@dataclass(frozen=True)
class Graph:
    """A whole program: nodes in topological order, output ids, and the storage of params/consts."""

    nodes: tuple[Node, ...]
    outputs: tuple[int, ...]
    tensors: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Results of analyses that describe the graph without changing it (the "placed" stage stores its
    # `fusec.placement.Placement` under "placement"). A pass that rebuilds the graph drops them.
    annotations: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def sizes(self) -> dict[str, tuple[int, int]]:
        """{name: (lo, hi)} of the symbolic size variables in the graph's types and attributes, bodies
        included (empty for a static graph); IRError if a name has two bounds."""
        from fusec.symbolic import sizes_of
        return sizes_of(v for n in self.walk() for v in (n.type.shape, *(a for _, a in n.attrs)))

    @property
    def inputs(self) -> tuple[int, ...]:
        """Ids of the `input` nodes, ordered by their `index` attribute."""
        ids = [i for i, n in enumerate(self.nodes) if n.op == "input"]
        return tuple(sorted(ids, key=lambda i: self.nodes[i].attr("index")))

    @property
    def input_types(self) -> tuple[TensorType, ...]:
        return tuple(self.nodes[i].type for i in self.inputs)

    def users(self) -> list[list[int]]:
        """users()[i] = ids of the nodes that read node i (an output counts as no user)."""
        out: list[list[int]] = [[] for _ in self.nodes]
        for i, n in enumerate(self.nodes):
            for a in n.args:
                out[a].append(i)
        return out

    def walk(self):
        """Every node, kernel and loop bodies included (a body's nodes follow its node)."""
        for n in self.nodes:
            yield n
            if n.op in ("kernel", "loop"):
                yield from n.attr("body").walk()

    def ops(self) -> dict[str, int]:
        """Count of nodes per op, for summaries."""
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def __repr__(self) -> str:
        from fusec.printer import format_graph
        return format_graph(self)


class Builder:
    """Appends nodes to a new graph, sharing identical nodes and inferring types.

    `add` returns the id of the node; an op whose node already exists returns the existing id (CSE).
    `finish` drops nodes the outputs do not need (DCE) and renumbers.
    """

    def __init__(self, tensors: Mapping[str, Any] | None = None):
        self.nodes: list[Node] = []
        self._index: dict[tuple, int] = {}
        self.tensors: dict[str, Any] = dict(tensors or {})
        self._stored: set[str] = set()  # keys of arrays const_array stored (never a parameter's key)

    def add(self, op: str, args: Iterable[int] = (), attrs: Mapping[str, Any] | None = None,
            type: TensorType | None = None, origin: str = "") -> int:
        from fusec.opset import infer
        args = tuple(args)
        frozen = make_attrs(attrs or {})
        for a in args:
            if not 0 <= a < len(self.nodes):
                raise IRError(f"{op}: operand %{a} does not exist yet (graph has {len(self.nodes)} nodes)")
        if type is None:
            type = infer(op, [self.nodes[a].type for a in args], dict(frozen))
        # floats keyed with their sign: -0.0 == 0.0, but x + -0.0 and x + 0.0 differ (for x = -0.0)
        key = (op, args, tuple((k, (v, math.copysign(1.0, v)) if isinstance(v, float) else v)
                               for k, v in frozen), type)
        found = self._index.get(key)
        if found is not None:
            return found
        self.nodes.append(Node(op, args, frozen, type, origin))
        self._index[key] = len(self.nodes) - 1
        return len(self.nodes) - 1

    def type(self, node_id: int) -> TensorType:
        return self.nodes[node_id].type

    def const(self, value: float | int | bool, dtype: str, shape: tuple[int, ...] = ()) -> int:
        """A splat constant: every element equals `value`."""
        return self.add("const", (), {"value": value}, TensorType(tuple(shape), dtype))

    def const_array(self, array: Any, dtype: str) -> int:
        """A stored constant array (numpy); identical arrays are stored once."""
        import numpy as np
        arr = np.ascontiguousarray(array)
        for key in self._stored:
            v = self.tensors[key]
            if (v.shape == arr.shape and v.dtype == arr.dtype and np.array_equal(v, arr)
                    and np.array_equal(np.signbit(v), np.signbit(arr))):  # -0.0 is not 0.0 (1/x)
                break
        else:
            n = len(self.tensors)
            while f"c{n}" in self.tensors:
                n += 1
            key = f"c{n}"
            self.tensors[key] = arr
            self._stored.add(key)
        return self.add("const", (), {"key": key}, TensorType(tuple(arr.shape), dtype))

    def finish(self, outputs: Iterable[int]) -> Graph:
        return prune(Graph(tuple(self.nodes), tuple(outputs), self.tensors))


def prune(graph: Graph) -> Graph:
    """Keep the nodes the outputs need, plus every input (the signature never changes); renumber."""
    live = [n.op == "input" for n in graph.nodes]
    stack = list(graph.outputs)
    while stack:
        i = stack.pop()
        if live[i] and graph.nodes[i].op != "input":
            continue
        live[i] = True
        stack.extend(a for a in graph.nodes[i].args if not live[a])
    remap: dict[int, int] = {}
    nodes: list[Node] = []
    for i, n in enumerate(graph.nodes):
        if live[i]:
            remap[i] = len(nodes)
            nodes.append(Node(n.op, tuple(remap[a] for a in n.args), n.attrs, n.type, n.origin))
    used = _tensor_keys(nodes)
    tensors = {k: v for k, v in graph.tensors.items() if k in used}
    return Graph(tuple(nodes), tuple(remap[o] for o in graph.outputs), tensors)


def _tensor_keys(nodes) -> set[str]:
    """Names of the params and stored constants the nodes use, kernel bodies included."""
    keys: set[str] = set()
    for n in nodes:
        if n.op == "param":
            keys.add(n.attr("name"))
        elif n.op == "const" and n.attr("key") is not None:
            keys.add(n.attr("key"))
        elif n.op in ("kernel", "loop"):
            keys |= _tensor_keys(n.attr("body").nodes)
        if n.op == "loop":
            keys |= {name for row in n.attr("weights") for name in row}
    return keys


def param_types(graph: Graph) -> dict[str, TensorType]:
    """{parameter name: type} of every weight the graph reads, those of every loop iteration included
    (a loop's body names iteration 0's; `weights` the others, of the same types)."""
    types = {n.attr("name"): n.type for n in graph.walk() if n.op == "param"}
    for n in graph.walk():
        if n.op == "loop":
            first = n.attr("weights")[0]
            for row in n.attr("weights"):
                types.update((name, types[w]) for name, w in zip(row, first))
    return types


def output_types(node: Node) -> list[TensorType]:
    """The types of a kernel's or a loop's outputs (what `result` reads). A loop's first outputs are its
    carried values after the last iteration, the others each iteration's value stacked on a new axis 0."""
    body = node.attr("body")
    types = [body.nodes[o].type for o in body.outputs]
    if node.op != "loop":
        return types
    nc = len(node.attr("carried"))
    return types[:nc] + [TensorType((node.attr("trips"),) + t.shape, t.dtype) for t in types[nc:]]


def verify(graph: Graph) -> None:
    """Check the invariants every pass must keep; raise IRError naming the first broken one."""
    from fusec.opset import OPS, infer
    graph.sizes  # noqa: B018 - raises when a size variable has two bounds
    seen_inputs = set()
    for i, n in enumerate(graph.nodes):
        where = f"%{i} = {n.op}"
        if n.op not in OPS:
            raise IRError(f"{where}: unknown op")
        for a in n.args:
            if not 0 <= a < i:
                raise IRError(f"{where}: operand %{a} is not an earlier node")
        expected = infer(n.op, [graph.nodes[a].type for a in n.args], dict(n.attrs), n.type)
        if expected != n.type:
            raise IRError(f"{where}: type is {n.type} but its operands give {expected}")
        if n.op == "kernel":
            _verify_kernel(graph, i, n)
        if n.op == "loop":
            from fusec.loop_verify import verify_loop
            verify_loop(graph, i, n)
        if n.op == "result":
            of = graph.nodes[n.args[0]] if len(n.args) == 1 else None
            types = output_types(of) if of is not None and of.op in ("kernel", "loop") else []
            if not 0 <= n.attr("index", -1) < len(types):
                raise IRError(f"{where}: must read an existing output of a kernel or loop node")
            if types[n.attr("index")] != n.type:
                raise IRError(f"{where}: type {n.type} differs from the {of.op}'s output {n.attr('index')}")
        if n.op == "input":
            idx = n.attr("index")
            if idx in seen_inputs:
                raise IRError(f"{where}: input index {idx} appears twice")
            seen_inputs.add(idx)
        if n.op == "param" and n.attr("name") not in graph.tensors:
            raise IRError(f"{where}: parameter {n.attr('name')!r} has no tensor")
        if n.op == "const" and n.attr("key") is not None and n.attr("key") not in graph.tensors:
            raise IRError(f"{where}: constant {n.attr('key')!r} has no array")
    if sorted(seen_inputs) != list(range(len(seen_inputs))):
        raise IRError(f"input indices are {sorted(seen_inputs)}, expected 0..{len(seen_inputs) - 1}")
    for o in graph.outputs:
        if not 0 <= o < len(graph.nodes):
            raise IRError(f"output %{o} does not exist")


def verify_body(where: str, body) -> None:
    """The nested graph of a kernel or loop node (`where` names it) exists and is valid."""
    if not isinstance(body, Graph):
        raise IRError(f"{where}: has no body graph")
    try:
        verify(body)
    except IRError as e:
        raise IRError(f"{where}: body: {e}") from e


def _verify_kernel(graph: Graph, i: int, n: Node) -> None:
    """A kernel's body is a valid graph whose inputs match the kernel's operands and whose output 0 is
    the kernel's type."""
    body = n.attr("body")
    where = f"%{i} = kernel {n.attr('kind')}"
    verify_body(where, body)
    arg_types = tuple(graph.nodes[a].type for a in n.args)
    if body.input_types != arg_types:
        raise IRError(f"{where}: body inputs {[str(t) for t in body.input_types]} do not match operands "
                      f"{[str(t) for t in arg_types]}")
    if not body.outputs or body.nodes[body.outputs[0]].type != n.type:
        raise IRError(f"{where}: type {n.type} differs from its body's output 0")
