"""Symbolic sizes in the IR (`fusec.symbolic`): arithmetic, decisions over the bounds, type inference,
the text form, JSON and the verifier."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fusec.errors import IRError
from fusec.export import to_json
from fusec.ir import Builder, Graph, Node, TensorType
from fusec.verify import verify
from fusec.printer import parse_graph
from fusec.symbolic import Sym, evaluate, interval, parse_size, upper

S0 = Sym.var("s0", 1, 256)
S1 = Sym.var("s1", 1, 8)


def test_size_arithmetic_keeps_the_polynomial_and_cancels_to_int():
    assert str(S0) == "s0" and str(S0 + 1) == "(s0+1)" and str(4 * S0) == "(4*s0)"
    assert str(S0 * S1) == "(s0*s1)" and str(1 - S0) == "(-s0+1)"
    assert S0 + 1 - S0 == 1 and isinstance(S0 + 1 - S0, int)
    assert (S0 * 64) // S0 == 64 and (S0 * 64) // 64 == S0 and (S0 * S1) // S1 == S0
    assert S0 + S0 == 2 * S0 and hash(S0 + 1) == hash(1 + S0)
    assert evaluate(2 * S0 * S1 + 3, {"s0": 5, "s1": 2}) == 23
    assert interval(S0 - 1) == (0, 255) and upper(4 * S0) == 1024


def test_inexact_division_raises():
    with pytest.raises(IRError, match="not a multiple"):
        (S0 + 1) // 2


def test_comparisons_are_answered_only_over_the_whole_range():
    assert S0 >= 1 and S0 <= 256 and S0 != 1 and not (S0 < 1) and S0 - 1 >= 0
    with pytest.raises(IRError, match="s0 < 100 depends on the sizes .*s0 in 1..256"):
        S0 < 100  # noqa: B015


def test_a_size_is_never_taken_as_an_int():
    with pytest.raises(TypeError, match="s0 is only known at run time"):
        range(S0)
    with pytest.raises(TypeError):
        np.empty((S0, 4))


def test_bad_bounds_and_undeclared_names_raise():
    with pytest.raises(IRError, match="1 <= lo <= hi"):
        Sym.var("s0", 0, 4)
    with pytest.raises(IRError, match="s1 .* has no bounds"):
        parse_size("(s0+s1)", {"s0": (1, 4)})


def _graph() -> Graph:
    b = Builder()
    x = b.add("input", (), {"index": 0, "name": "x"}, TensorType((1, S0, 64), "f32"))
    r = b.add("reshape", (x,), {"shape": (S0, 64)})
    w = b.add("param", (), {"name": "w"}, TensorType((64, 32), "f32"))
    m = b.add("matmul", (r, w))
    c = b.add("concat", (m, m), {"axis": 0})
    i = b.add("iota", (), {"shape": (S0,), "axis": 0, "dtype": "i64"})
    s = b.add("slice", (c,), {"axis": 0, "start": 1, "stop": S0 + 1, "step": 1})
    h = b.add("reshape", (x,), {"shape": (1, S0, 4, 16)})
    g = b.finish([c, i, s, h])
    g.tensors["w"] = np.zeros((64, 32), np.float32)
    return g


def test_type_inference_with_symbolic_dims():
    g = _graph()
    verify(g)
    shapes = [g.nodes[o].shape for o in g.outputs]
    assert shapes == [(2 * S0, 32), (S0,), (S0, 32), (1, S0, 4, 16)]
    assert g.sizes == {"s0": (1, 256)}


def test_inference_rejects_mismatched_symbolic_dims():
    b = Builder()
    x = b.add("input", (), {"index": 0, "name": "x"}, TensorType((S0, 64), "f32"))
    y = b.add("input", (), {"index": 1, "name": "y"}, TensorType((S1, 64), "f32"))
    with pytest.raises(IRError, match="do not broadcast"):
        b.add("add", (x, y))
    with pytest.raises(IRError, match="cannot reshape"):
        b.add("reshape", (x,), {"shape": (S0, 32)})
    with pytest.raises(IRError, match="matmul"):
        b.add("matmul", (x, x))


def test_text_round_trip_declares_the_sizes():
    g = _graph()
    text = repr(g)
    assert text.splitlines()[0] == "sizes {s0=[1,256]}"
    assert "f32[(2*s0),32]" in text and "stop=(s0+1)" in text
    back = parse_graph(text, g.tensors)
    verify(back)
    assert back == g and repr(back) == text


def test_text_with_an_undeclared_size_is_rejected():
    text = '%0 = input {index=0, name="x"} : f32[s0,4]\nreturn %0'
    with pytest.raises(IRError, match="s0 .* has no bounds"):
        parse_graph(text)


def test_verify_rejects_one_name_with_two_bounds():
    other = Sym.var("s0", 1, 16)
    x = Node("input", (), (("index", 0), ("name", "x")), TensorType((S0,), "f32"))
    y = Node("input", (), (("index", 1), ("name", "y")), TensorType((other,), "f32"))
    with pytest.raises(IRError, match="s0 has two bounds"):
        verify(Graph((x, y), (0, 1)))


def test_json_names_sizes_as_text():
    data = json.loads(to_json(_graph()))
    assert data["sizes"] == {"s0": [1, 256]}
    assert data["nodes"][0]["shape"] == [1, "s0", 64]
