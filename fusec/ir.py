"""fusec IR: a graph of immutable nodes over a small set of primitive ops.

A `Graph` is plain data: a tuple of `Node`s in topological order, where a node refers to its operands by
their position in that tuple, plus the ids of the outputs. Weights are `param` nodes naming an entry of
`Graph.tensors` (the module's own tensors, never copied); folded constants are `const` nodes, either a
splat (`value=`, any shape) or a stored array (`key=` into `Graph.tensors`).

Graphs are built through `Builder`, which hash-conses nodes (an identical node is created once, so common
subexpressions are shared by construction) and infers each node's type from its operands (`opset.infer`).

The IR layer, bottom up: value types (`fusec.ir_types`) <- the op set and its type rules (`fusec.opset`)
<- the graph and its text form (here: `repr` prints it) <- the parser (`fusec.printer`) and the verifier
(`fusec.verify`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Mapping

import numpy as np

from fusec.errors import IRError
from fusec.ir_types import DTYPES, FLOAT_DTYPES, TensorType, dtype_size  # noqa: F401 - re-exported
from fusec.opset import infer
from fusec.symbolic import sizes_of

Attrs = tuple[tuple[str, Any], ...]


def make_attrs(attrs: Mapping[str, Any]) -> Attrs:
    """Attributes as a sorted tuple of pairs, with lists turned into tuples so nodes stay hashable."""
    def freeze(v):
        return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v
    return tuple(sorted((k, freeze(v)) for k, v in attrs.items()))


def _plain(value: Any) -> bool:
    """True for an attribute or shape that holds no size variable for sure (most of them: a quick look
    before `sizes_of`'s walk, which verifying every pass's graph spent a third of its time in)."""
    if type(value) is tuple:
        return all(type(x) is int for x in value)
    return value is None or type(value) in (int, float, str, bool)



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
    # `fusec.rdu.placement.Placement` under "placement"). A pass that rebuilds the graph drops them.
    annotations: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def sizes(self) -> dict[str, tuple[int, int]]:
        """{name: (lo, hi)} of the symbolic size variables in the graph's types and attributes, bodies
        included (empty for a static graph); IRError if a name has two bounds."""
        return dict(self._sizes)

    @cached_property  # (a graph never changes; the tiling pass asks each kernel's body for them)
    def _sizes(self) -> dict[str, tuple[int, int]]:
        return sizes_of(v for n in self.walk() for v in (n.type.shape, *(a for _, a in n.attrs))
                        if not _plain(v))

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


# --- the text form (parsed back by `fusec.printer.parse_graph`) ---------------------------------------
# It lives beside `Graph` because `repr` prints it: the parser, which builds graphs, sits above.

def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return "nan"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, tuple):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    return str(v)  # an int, or a symbolic size (`s0`, `(s0+1)`)


def format_node(i: int, n: Node) -> str:
    text = f"%{i} = {n.op}"
    if n.args:
        text += " " + ", ".join(f"%{a}" for a in n.args)
    shown = [(k, v) for k, v in n.attrs if not isinstance(v, Graph)]
    if shown:
        text += " {" + ", ".join(f"{k}={format_value(v)}" for k, v in shown) + "}"
    return f"{text} : {n.type}"


def format_graph(graph: Graph, indent: str = "") -> str:
    sizes = graph.sizes if not indent else {}  # declared once, at the top (bodies use the same names)
    lines = ["sizes {" + ", ".join(f"{k}=[{lo},{hi}]" for k, (lo, hi) in sorted(sizes.items())) + "}"] if sizes else []
    for i, n in enumerate(graph.nodes):
        lines.append(indent + format_node(i, n))
        for k, v in n.attrs:
            if isinstance(v, Graph):
                lines.append(f"{indent}  {k} {{")
                lines.append(format_graph(v, indent + "    "))
                lines.append(f"{indent}  }}")
    lines.append(indent + "return " + ", ".join(f"%{o}" for o in graph.outputs))
    return "\n".join(lines)
