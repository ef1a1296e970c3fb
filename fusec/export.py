"""Machine-readable forms of a graph: JSON (for tools), Graphviz DOT (for pictures), and the exact data
form the trace cache stores (`graph_to_data` / `graph_from_data`).

The text form in `fusec.printer` stays the one human-readable printer; these carry the same data. The JSON
for tools spells sizes and non-finite numbers as the printer does; the data form keeps every value's
type instead (a tuple stays a tuple, a size keeps its bounds), so that reading it back gives a graph
equal to the one written, node for node.
"""
from __future__ import annotations

import json
from typing import Any

from fusec.ir import Graph, Node, TensorType
from fusec.opset import OPS
from fusec.printer import format_value
from fusec.symbolic import Sym


def _attr_json(v: Any) -> Any:
    if isinstance(v, Graph):
        return graph_to_dict(v)
    if isinstance(v, Sym):
        return str(v)  # a symbolic size, as the printer spells it ("s0", "(s0+1)")
    if isinstance(v, tuple):
        return [_attr_json(x) for x in v]
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return format_value(v)  # JSON has no inf/nan: keep the printer's spelling
    return v


def graph_to_dict(graph: Graph) -> dict:
    return {
        "nodes": [{"id": i, "op": n.op, "args": list(n.args),
                   "attrs": {k: _attr_json(v) for k, v in n.attrs},
                   "shape": [_attr_json(d) for d in n.shape], "dtype": n.dtype,
                   **({"origin": n.origin} if n.origin else {})}
                  for i, n in enumerate(graph.nodes)],
        "outputs": list(graph.outputs),
        **({"sizes": {k: list(v) for k, v in graph.sizes.items()}} if graph.sizes else {}),
    }


def to_json(graph: Graph) -> str:
    return json.dumps(graph_to_dict(graph), indent=1)


_COLORS = {"source": "lightgrey", "elementwise": "lightblue", "layout": "khaki", "reduce": "salmon",
           "matmul": "palegreen", "gather": "plum", "kernel": "orange"}


def to_dot(graph: Graph, name: str = "fusec") -> str:
    lines = [f'digraph "{name}" {{', "  rankdir=TB;", '  node [shape=box, style=filled, fontname="monospace"];']
    for i, n in enumerate(graph.nodes):
        label = f"%{i} {n.op}\\n{n.type}"
        kind = n.attr("kind")
        if kind:
            label += f"\\n{kind}"
        lines.append(f'  n{i} [label="{label}", fillcolor={_COLORS.get(OPS.get(n.op, ""), "white")}];')
        for a in n.args:
            lines.append(f"  n{a} -> n{i};")
    for k, o in enumerate(graph.outputs):
        lines.append(f'  out{k} [label="output {k}", shape=ellipse, fillcolor=white];')
        lines.append(f"  n{o} -> out{k};")
    lines.append("}")
    return "\n".join(lines)


# --- the exact data form (the trace cache's) ---------------------------------------------------------------
# JSON values stand for themselves (floats with their exact repr; json writes inf and nan as Infinity and
# NaN), a list is a tuple, and the two other kinds of value are objects with one tag: {"sym": ...} for a
# `Sym`, {"graph": ...} for a body. Any other value cannot be stored: UnstorableValue, and the caller
# does without the cache.

class UnstorableValue(TypeError):
    """A graph holds a value the data form does not carry (its caller then does not cache it)."""


_PLAIN = (type(None), bool, int, float, str)


def _value_data(v: Any, pool: dict) -> Any:
    if type(v) in _PLAIN:  # exactly these: a NumPy scalar would come back as another type
        return v
    if type(v) is tuple:
        return [_value_data(x, pool) for x in v]
    if isinstance(v, Sym):
        return {"sym": [[list(m), c] for m, c in v.terms], "bounds": [list(b) for b in v.bounds]}
    if isinstance(v, Graph):
        return {"graph": graph_to_data(v, pool)}
    raise UnstorableValue(f"a value of type {type(v).__name__} ({v!r:.60})")


def _value_from(d: Any, pool: dict) -> Any:
    if isinstance(d, list):
        return tuple(_value_from(x, pool) for x in d)
    if isinstance(d, dict):
        if "sym" in d:
            return Sym(tuple((tuple(m), c) for m, c in d["sym"]), tuple(tuple(b) for b in d["bounds"]))
        return graph_from_data(d["graph"], pool)
    return d


def graph_to_data(graph: Graph, pool: dict) -> dict:
    """The JSON-able data of `graph`. Its tensors (and its bodies') are named, and collected in `pool`
    {name: tensor} for the caller to store: a name means one tensor throughout, else UnstorableValue."""
    for name, t in graph.tensors.items():
        if pool.setdefault(name, t) is not t:
            raise UnstorableValue(f"two different tensors named {name!r}")
    return {"nodes": [[n.op, list(n.args), [[k, _value_data(v, pool)] for k, v in n.attrs],
                       [_value_data(d, pool) for d in n.shape], n.dtype, n.origin] for n in graph.nodes],
            "outputs": list(graph.outputs), "tensors": sorted(graph.tensors)}


def graph_from_data(data: dict, pool: dict) -> Graph:
    """The graph `graph_to_data` gave `data` for, its tensors (and its bodies') taken from `pool`."""
    nodes = tuple(Node(op, tuple(args), tuple((k, _value_from(v, pool)) for k, v in attrs),
                       TensorType(tuple(_value_from(d, pool) for d in shape), dtype), origin)
                  for op, args, attrs, shape, dtype, origin in data["nodes"])
    return Graph(nodes, tuple(data["outputs"]), {name: pool[name] for name in data["tensors"]})
