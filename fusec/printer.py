"""The one text form of the IR: printed by `repr`, the CLI and golden tests, and parsed back.

    %0 = input {index=0, name="x"} : f32[2,8]
    %1 = const {value=2.0} : f32[]
    %2 = mul %0, %1 : f32[2,8]
    return %2

A fused kernel prints its body indented under it, ending with `}`. A graph with symbolic sizes
(`fusec.symbolic`) starts with their bounds, and its shapes and attributes name them:

    sizes {s0=[1,256]}
    %0 = input {index=0, name="x"} : f32[1,s0,64]
    %1 = reshape %0 {shape=[s0,64]} : f32[s0,64]
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from fusec.errors import IRError
from fusec.ir import Graph, Node, TensorType, make_attrs
from fusec.symbolic import parse_size


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


_SIZE = r"\([-+*\w]+\)|[a-z]\w*"  # a symbolic size: a name, or a parenthesized polynomial
_TOKEN = re.compile(r'\s*(-?inf|nan|true|false|"(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*|[\[\],]|' + _SIZE + ')')
_NODE = re.compile(r"%(\d+) = (\w+)((?: %\d+,?)*)(?: \{(.*)\})? : (\w+)\[([-+*()\w,]*)\]$")
_SIZES = re.compile(r"sizes \{(.*)\}$")


def _parse_value(text: str, pos: int = 0, bounds: dict | None = None) -> tuple[Any, int]:
    m = _TOKEN.match(text, pos)
    if not m:
        raise IRError(f"cannot parse attribute value at {text[pos:pos + 20]!r}")
    tok, pos = m.group(1), m.end()
    if tok == "[":
        items = []
        while True:
            m2 = _TOKEN.match(text, pos)
            if m2 and m2.group(1) == "]":
                return tuple(items), m2.end()
            if items:
                if not m2 or m2.group(1) != ",":
                    raise IRError(f"expected ',' in list at {text[pos:pos + 20]!r}")
                pos = m2.end()
            item, pos = _parse_value(text, pos, bounds)
            items.append(item)
    if tok.startswith('"'):
        return json.loads(tok), pos
    if tok in ("true", "false"):
        return tok == "true", pos
    if tok in ("inf", "-inf", "nan"):
        return float(tok), pos
    if re.fullmatch(_SIZE, tok):
        return parse_size(tok, bounds or {}), pos
    return (float(tok) if any(c in tok for c in ".eE") else int(tok)), pos


def _parse_attrs(text: str, bounds: dict) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    pos = 0
    while pos < len(text):
        m = re.compile(r"\s*(\w+)=").match(text, pos)
        if not m:
            raise IRError(f"cannot parse attributes at {text[pos:pos + 20]!r}")
        attrs[m.group(1)], pos = _parse_value(text, m.end(), bounds)
        m = re.compile(r"\s*,?").match(text, pos)
        pos = m.end()
    return attrs


def parse_graph(text: str, tensors: dict[str, Any] | None = None) -> Graph:
    """Parse the printed form back into a Graph. `tensors` supplies params and stored constants."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    bounds: dict[str, tuple[int, int]] = {}
    m = _SIZES.match(lines[0]) if lines else None
    if m:
        from fusec.symbolic import check_bounds
        for name, lo, hi in re.findall(r"(\w+)=\[(-?\d+),(-?\d+)\]", m.group(1)):
            check_bounds(name, int(lo), int(hi))
            bounds[name] = (int(lo), int(hi))
    graph, rest = _parse_lines(lines, 1 if m else 0, tensors or {}, bounds)
    if rest != len(lines):
        raise IRError(f"unexpected text after 'return': {lines[rest]!r}")
    return graph


def _parse_lines(lines: list[str], pos: int, tensors: dict[str, Any], bounds: dict) -> tuple[Graph, int]:
    nodes: list[Node] = []
    while pos < len(lines):
        line = lines[pos]
        if line.startswith("return"):
            outs = tuple(int(x) for x in re.findall(r"%(\d+)", line))
            return Graph(tuple(nodes), outs, tensors), pos + 1
        m = _NODE.match(line)
        if not m:
            raise IRError(f"cannot parse IR line {pos + 1}: {line!r}")
        idx, op, args, attrs, dtype, shape = m.groups()
        if int(idx) != len(nodes):
            raise IRError(f"line {pos + 1}: expected %{len(nodes)}, found %{idx}")
        attr_map = _parse_attrs(attrs or "", bounds)
        pos += 1
        while pos < len(lines) and re.fullmatch(r"\w+ \{", lines[pos]):
            name = lines[pos].split()[0]
            attr_map[name], pos = _parse_lines(lines, pos + 1, tensors, bounds)
            if pos >= len(lines) or lines[pos] != "}":
                raise IRError(f"line {pos + 1}: expected '}}' closing the body of %{idx}")
            pos += 1
        arg_ids = tuple(int(a) for a in re.findall(r"%(\d+)", args))
        ttype = TensorType(tuple(parse_size(d, bounds) for d in shape.split(",") if d), dtype)
        nodes.append(Node(op, arg_ids, make_attrs(attr_map), ttype))
    raise IRError("IR text ends without a 'return' line")
