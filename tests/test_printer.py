"""The IR's one text form (golden text, parse round trip), its JSON and DOT exports, and `verify`."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from fusec.errors import IRError
from fusec.export import graph_to_dict, to_dot, to_json
from fusec.ir import Builder, Graph, Node, TensorType, make_attrs
from fusec.verify import verify
from fusec.printer import format_graph, parse_graph

F32_2x8 = TensorType((2, 8), "f32")


def small_graph() -> Graph:
    """x * w * 2, normalised by its row sums, transposed; two outputs."""
    b = Builder({"w": np.ones(8, np.float32)})
    x = b.add("input", (), {"index": 0, "name": "x"}, F32_2x8)
    w = b.add("param", (), {"name": "w"}, TensorType((8,), "f32"))
    two = b.const(2.0, "f32")
    m = b.add("mul", (b.add("mul", (x, w)), two))
    s = b.add("sum", (m,), {"axes": (1,), "keepdim": True})
    p = b.add("permute", (b.add("div", (m, s)),), {"perm": (1, 0)})
    return b.finish([p, s])


SMALL_GRAPH_TEXT = """\
%0 = input {index=0, name="x"} : f32[2,8]
%1 = param {name="w"} : f32[8]
%2 = const {value=2.0} : f32[]
%3 = mul %0, %1 : f32[2,8]
%4 = mul %3, %2 : f32[2,8]
%5 = sum %4 {axes=[1], keepdim=true} : f32[2,1]
%6 = div %4, %5 : f32[2,8]
%7 = permute %6 {perm=[1,0]} : f32[8,2]
return %7, %5"""


def kernel_graph() -> Graph:
    """A graph whose middle node is a fused kernel holding its own subgraph in the `body` attribute."""
    sb = Builder()
    a = sb.add("input", (), {"index": 0, "name": "a"}, F32_2x8)
    c = sb.add("input", (), {"index": 1, "name": "c"}, TensorType((8,), "f32"))
    body = sb.finish([sb.add("add", (sb.add("exp", (a,)), c))])
    b = Builder({"w": np.ones(8, np.float32)})
    x = b.add("input", (), {"index": 0, "name": "x"}, F32_2x8)
    w = b.add("param", (), {"name": "w"}, TensorType((8,), "f32"))
    k = b.add("kernel", (x, w), {"body": body, "kind": "pointwise", "tile": (2, 4)}, F32_2x8)
    return b.finish([b.add("neg", (k,))])


KERNEL_GRAPH_TEXT = """\
%0 = input {index=0, name="x"} : f32[2,8]
%1 = param {name="w"} : f32[8]
%2 = kernel %0, %1 {kind="pointwise", tile=[2,4]} : f32[2,8]
  body {
    %0 = input {index=0, name="a"} : f32[2,8]
    %1 = input {index=1, name="c"} : f32[8]
    %2 = exp %0 : f32[2,8]
    %3 = add %2, %1 : f32[2,8]
    return %3
  }
%3 = neg %2 : f32[2,8]
return %3"""


# --- golden text --------------------------------------------------------------------------------------

def test_small_graph_prints_exactly():
    g = small_graph()
    assert repr(g) == SMALL_GRAPH_TEXT
    assert format_graph(g) == SMALL_GRAPH_TEXT


def test_kernel_body_prints_indented_under_its_node():
    assert repr(kernel_graph()) == KERNEL_GRAPH_TEXT


def test_printing_is_deterministic_across_builds():
    assert repr(small_graph()) == repr(small_graph())


# --- parse round trip ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [small_graph, kernel_graph], ids=["small", "kernel"])
def test_parse_of_repr_gives_the_same_graph(make):
    g = make()
    parsed = parse_graph(repr(g), dict(g.tensors))
    assert parsed == g
    assert repr(parsed) == repr(g)
    verify(parsed)


def test_kernel_body_parses_back_into_a_graph_attr():
    parsed = parse_graph(KERNEL_GRAPH_TEXT, {"w": np.ones(8, np.float32)})
    body = parsed.nodes[2].attr("body")
    assert isinstance(body, Graph)
    assert [n.op for n in body.nodes] == ["input", "input", "exp", "add"]
    assert body.outputs == (3,)
    assert parsed.nodes[2].attr("tile") == (2, 4)


def test_parse_keeps_tensors_by_reference():
    w = np.arange(8, dtype=np.float32)
    parsed = parse_graph(SMALL_GRAPH_TEXT, {"w": w})
    assert parsed.tensors["w"] is w


@pytest.mark.parametrize("value, text", [
    (float("-inf"), "-inf"),
    (float("inf"), "inf"),
    (1e-05, "1e-05"),
    (-2.5e+20, "-2.5e+20"),
    (0.1, "0.1"),
    (3, "3"),
    (True, "true"),
])
def test_special_and_small_floats_print_and_parse(value, text):
    dtype = "bool" if isinstance(value, bool) else "f32"
    b = Builder()
    g = b.finish([b.const(value, dtype, (2, 3))])
    printed = repr(g)
    assert printed.splitlines()[0] == f"%0 = const {{value={text}}} : {dtype}[2,3]"
    parsed = parse_graph(printed)
    got = parsed.nodes[0].attr("value")
    assert got == value and type(got) is type(value)
    assert parsed == g


def test_nan_prints_and_parses():
    b = Builder()
    g = b.finish([b.const(float("nan"), "f32")])
    assert repr(g).splitlines()[0] == "%0 = const {value=nan} : f32[]"
    got = parse_graph(repr(g)).nodes[0].attr("value")
    assert isinstance(got, float) and math.isnan(got)


def test_strings_with_special_characters_round_trip():
    name = 'a "quoted", {braced} = name : f32[1]'
    b = Builder()
    g = b.finish([b.add("input", (), {"index": 0, "name": name}, TensorType((1,), "f32"))])
    assert parse_graph(repr(g)).nodes[0].attr("name") == name


def test_nested_and_empty_lists_round_trip():
    node = Node("const", (), make_attrs({"value": 0.0, "extra": ((1, 2), (), (-3,))}), TensorType((), "f32"))
    g = Graph((node,), (0,))
    assert "extra=[[1,2],[],[-3]]" in repr(g)
    assert parse_graph(repr(g)) == g


@pytest.mark.parametrize("text, words", [
    ("%0 = input {index=0} : f32[2]", "return"),
    ("%1 = input {index=0} : f32[2]\nreturn %1", "%0"),
    ("%0 = input index=0 : f32[2]\nreturn %0", "line 1"),
])
def test_parse_errors_say_what_is_wrong(text, words):
    with pytest.raises(IRError, match=re.escape(words)):
        parse_graph(text)


# --- JSON and DOT -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [small_graph, kernel_graph], ids=["small", "kernel"])
def test_json_round_trips_nodes_and_types(make):
    g = make()
    data = json.loads(to_json(g))
    assert len(data["nodes"]) == len(g.nodes)
    assert data["outputs"] == list(g.outputs)
    for i, (d, n) in enumerate(zip(data["nodes"], g.nodes)):
        assert d["id"] == i
        assert d["op"] == n.op
        assert d["args"] == list(n.args)
        assert TensorType(tuple(d["shape"]), d["dtype"]) == n.type
    assert data == graph_to_dict(g)


def test_json_nests_a_kernel_body():
    data = json.loads(to_json(kernel_graph()))
    body = data["nodes"][2]["attrs"]["body"]
    assert [n["op"] for n in body["nodes"]] == ["input", "input", "exp", "add"]
    assert body["outputs"] == [3]


def test_json_is_strict_even_with_inf_and_nan():
    b = Builder()
    g = b.finish([b.const(float("-inf"), "f32"), b.const(float("nan"), "f32", (2,))])

    def reject(token):
        raise AssertionError(f"to_json wrote the non-JSON constant {token}")
    data = json.loads(to_json(g), parse_constant=reject)
    assert [n["attrs"]["value"] for n in data["nodes"]] == ["-inf", "nan"]


@pytest.mark.parametrize("make", [small_graph, kernel_graph], ids=["small", "kernel"])
def test_dot_has_one_node_line_per_ir_node(make):
    g = make()
    dot = to_dot(g, "demo")
    lines = dot.splitlines()
    assert lines[0] == 'digraph "demo" {'
    assert lines[-1] == "}"
    node_lines = [ln for ln in lines if re.match(r"\s*n\d+ \[label=", ln)]
    assert len(node_lines) == len(g.nodes)
    for i, n in enumerate(g.nodes):
        assert sum(ln.strip().startswith(f"n{i} [label=\"%{i} {n.op}\\n{n.type}") for ln in node_lines) == 1
    edges = [ln for ln in lines if re.fullmatch(r"\s*n\d+ -> n\d+;", ln)]
    assert len(edges) == sum(len(n.args) for n in g.nodes)
    assert sum(bool(re.match(r"\s*out\d+ \[", ln)) for ln in lines) == len(g.outputs)


# --- verify -------------------------------------------------------------------------------------------

def test_verify_accepts_built_graphs():
    verify(small_graph())
    verify(kernel_graph())


def _with_node(g: Graph, i: int, node: Node, tensors=None) -> Graph:
    nodes = list(g.nodes)
    nodes[i] = node
    return Graph(tuple(nodes), g.outputs, g.tensors if tensors is None else tensors)


def test_verify_rejects_a_wrong_node_type():
    g = small_graph()
    bad = g.nodes[3]
    g = _with_node(g, 3, Node(bad.op, bad.args, bad.attrs, TensorType((2, 8), "f64")))
    with pytest.raises(IRError, match=r"%3 = mul.*f64\[2,8\].*f32\[2,8\]"):
        verify(g)


def test_verify_rejects_a_wrong_node_shape():
    g = small_graph()
    bad = g.nodes[5]
    g = _with_node(g, 5, Node(bad.op, bad.args, bad.attrs, TensorType((2,), "f32")))
    with pytest.raises(IRError, match=r"%5 = sum.*f32\[2\].*f32\[2,1\]"):
        verify(g)


def test_verify_rejects_a_forward_reference():
    g = small_graph()
    bad = g.nodes[3]
    g = _with_node(g, 3, Node(bad.op, (0, 6), bad.attrs, bad.type))
    with pytest.raises(IRError, match=r"%3 = mul: operand %6 is not an earlier node"):
        verify(g)


def test_verify_rejects_a_self_reference():
    g = small_graph()
    bad = g.nodes[3]
    g = _with_node(g, 3, Node(bad.op, (0, 3), bad.attrs, bad.type))
    with pytest.raises(IRError, match=r"%3 = mul: operand %3"):
        verify(g)


def test_verify_rejects_a_missing_param_tensor():
    g = Graph(small_graph().nodes, small_graph().outputs, {})
    with pytest.raises(IRError, match=r"%1 = param: parameter 'w' has no tensor"):
        verify(g)


def test_verify_rejects_an_unknown_op_and_a_missing_output():
    g = small_graph()
    bad = g.nodes[4]
    with pytest.raises(IRError, match=r"%4 = frobnicate: unknown op"):
        verify(_with_node(g, 4, Node("frobnicate", bad.args, bad.attrs, bad.type)))
    with pytest.raises(IRError, match=r"output %99"):
        verify(Graph(g.nodes, (99,), g.tensors))


def test_verify_checks_every_new_body_and_node_after_equal_valid_ones():
    # verify remembers bodies and nodes it found valid (the pipeline verifies after every pass): a new,
    # broken body or node is still checked, however many valid ones like it came before
    good = kernel_graph()
    verify(good)
    verify(good)
    k = good.nodes[2]
    body = k.attr("body")
    broken = Graph(tuple(Node(n.op, n.args, n.attrs, TensorType((2, 8), "f64")) if i == 2 else n
                         for i, n in enumerate(body.nodes)), body.outputs, body.tensors)
    attrs = tuple((name, broken if name == "body" else v) for name, v in k.attrs)
    with pytest.raises(IRError, match=r"%2 = kernel pointwise: body: %2 = exp.*f64\[2,8\].*f32\[2,8\]"):
        verify(_with_node(good, 2, Node(k.op, k.args, attrs, k.type)))
    verify(good)


def test_verify_tells_apart_attributes_python_finds_equal():
    from fusec.verify import _exact
    assert _exact((1, 2)) != _exact((True, 2))
    assert _exact(1) != _exact(1.0)
    assert _exact(0.0) != _exact(-0.0)
    assert _exact((("shape", (2, 8)),)) == _exact((("shape", (2, 8)),))
