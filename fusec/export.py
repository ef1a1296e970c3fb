"""Machine-readable forms of a graph: JSON (for tools) and Graphviz DOT (for pictures).

The text form in `fusec.printer` stays the one human-readable printer; these carry the same data.
"""
from __future__ import annotations

import json
from typing import Any

from fusec.ir import Graph
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
