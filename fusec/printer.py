"""The one text form of the IR: printed by `repr`, the CLI and golden tests, and parsed back.

    %0 = input {index=0, name="x"} : f32[2,8]
    %1 = const {value=2.0} : f32[]
    %2 = mul %0, %1 : f32[2,8]
    return %2

A fused kernel prints its body indented under it, ending with `}`.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from fusec.errors import IRError
from fusec.ir import Graph, Node, TensorType, make_attrs


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
    return str(v)


def format_node(i: int, n: Node) -> str:
    text = f"%{i} = {n.op}"
    if n.args:
        text += " " + ", ".join(f"%{a}" for a in n.args)
    shown = [(k, v) for k, v in n.attrs if not isinstance(v, Graph)]
    if shown:
        text += " {" + ", ".join(f"{k}={format_value(v)}" for k, v in shown) + "}"
    return f"{text} : {n.type}"


def format_graph(graph: Graph, indent: str = "") -> str:
    lines = []
    for i, n in enumerate(graph.nodes):
        lines.append(indent + format_node(i, n))
        for k, v in n.attrs:
            if isinstance(v, Graph):
                lines.append(f"{indent}  {k} {{")
                lines.append(format_graph(v, indent + "    "))
                lines.append(f"{indent}  }}")
    lines.append(indent + "return " + ", ".join(f"%{o}" for o in graph.outputs))
    return "\n".join(lines)


_TOKEN = re.compile(r'\s*(-?inf|nan|true|false|"(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*|[\[\],])')
_NODE = re.compile(r"%(\d+) = (\w+)((?: %\d+,?)*)(?: \{(.*)\})? : (\w+)\[([0-9,]*)\]$")


def _parse_value(text: str, pos: int = 0) -> tuple[Any, int]:
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
            item, pos = _parse_value(text, pos)
            items.append(item)
    if tok.startswith('"'):
        return json.loads(tok), pos
    if tok in ("true", "false"):
        return tok == "true", pos
    if tok in ("inf", "-inf", "nan"):
        return float(tok), pos
    return (float(tok) if any(c in tok for c in ".eE") else int(tok)), pos


def _parse_attrs(text: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    pos = 0
    while pos < len(text):
        m = re.compile(r"\s*(\w+)=").match(text, pos)
        if not m:
            raise IRError(f"cannot parse attributes at {text[pos:pos + 20]!r}")
        attrs[m.group(1)], pos = _parse_value(text, m.end())
        m = re.compile(r"\s*,?").match(text, pos)
        pos = m.end()
    return attrs


def parse_graph(text: str, tensors: dict[str, Any] | None = None) -> Graph:
    """Parse the printed form back into a Graph. `tensors` supplies params and stored constants."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    graph, rest = _parse_lines(lines, 0, tensors or {})
    if rest != len(lines):
        raise IRError(f"unexpected text after 'return': {lines[rest]!r}")
    return graph


def _parse_lines(lines: list[str], pos: int, tensors: dict[str, Any]) -> tuple[Graph, int]:
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
        attr_map = _parse_attrs(attrs or "")
        pos += 1
        while pos < len(lines) and re.fullmatch(r"\w+ \{", lines[pos]):
            name = lines[pos].split()[0]
            attr_map[name], pos = _parse_lines(lines, pos + 1, tensors)
            if pos >= len(lines) or lines[pos] != "}":
                raise IRError(f"line {pos + 1}: expected '}}' closing the body of %{idx}")
            pos += 1
        arg_ids = tuple(int(a) for a in re.findall(r"%(\d+)", args))
        ttype = TensorType(tuple(int(d) for d in shape.split(",") if d), dtype)
        nodes.append(Node(op, arg_ids, make_attrs(attr_map), ttype))
    raise IRError("IR text ends without a 'return' line")
