"""The one text form of the IR: printed by `repr`, the CLI and golden tests, and parsed back (the
formatter is `fusec.ir.format_graph`, beside `Graph`, re-exported here; the parser is here).

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
import re
from typing import Any

from fusec.errors import IRError
# the printer lives beside `Graph` (its `repr`); re-exported so the text form has one home to import
from fusec.ir import Graph, Node, TensorType, format_graph, format_node, format_value, make_attrs
from fusec.symbolic import check_bounds, parse_size


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


__all__ = ["format_graph", "format_node", "format_value", "parse_graph"]
