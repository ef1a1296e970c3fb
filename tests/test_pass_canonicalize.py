"""Canonicalization passes and the rule-table rewriter: IR text in, IR text out; a second run changes
nothing; the reference backend computes the same outputs before and after (tests/canonicalize_checks.py).
The rewriter, dead code, common subexpressions, constant folding and the whole pipeline here; the algebraic
identities and the view simplifications in test_pass_canonicalize_algebra.py."""
from __future__ import annotations

import numpy as np
import pytest

from canonicalize_checks import check
from fusec.errors import IRError
from fusec.ir import Builder, TensorType
from fusec.printer import format_graph, parse_graph
from fusec.passes.canonicalize import (canonicalize, eliminate_common_subexpressions, eliminate_dead_code,
                                       fold_constants)
from fusec.passes.rewrite import rewrite


# --- rewrite ------------------------------------------------------------------------------------------

def test_rewrite_keeps_origin_and_reaches_a_fixed_point_per_node():
    b = Builder()
    x = b.add("input", (), {"index": 0, "name": "x"}, TensorType((2, 3), "f32"), origin="model.py:1")
    y = b.add("neg", [x], origin="model.py:2")
    z = b.add("neg", [y], origin="model.py:3")
    w = b.add("neg", [z], origin="model.py:4")
    rules = (("neg", lambda c, x: c.node(x).args[0] if c.is_op(x, "neg") else None),)   # -(-x) -> x
    out = rewrite(b.finish([w]), rules)
    assert format_graph(out) == '%0 = input {index=0, name="x"} : f32[2,3]\n%1 = neg %0 : f32[2,3]\nreturn %1'
    assert [n.origin for n in out.nodes] == ["model.py:1", "model.py:2"]


def test_rewrite_rejects_a_cycling_rule_table():
    graph = parse_graph('%0 = input {index=0, name="x"} : f32[2]\n%1 = neg %0 : f32[2]\nreturn %1')
    rules = (("neg", lambda c, x: c.add("neg", [c.add("neg", [c.id])])),)  # -x -> ---x, forever
    with pytest.raises(IRError, match="cycles"):
        rewrite(graph, rules)


def test_rewrite_rejects_a_replacement_of_another_type():
    graph = parse_graph('%0 = input {index=0, name="x"} : f32[2]\n%1 = neg %0 : f32[2]\nreturn %1')
    rules = (("neg", lambda c, x: c.add("cast", [x], {"dtype": "f64"})),)  # wrong: -x -> f64(x)
    with pytest.raises(IRError, match="replaced a f32\\[2\\] by %2 = cast : f64\\[2\\]"):
        rewrite(graph, rules)


# --- dead code and common subexpressions --------------------------------------------------------------

def test_dce_drops_dead_nodes_but_keeps_every_input():
    check(eliminate_dead_code, """
        %0 = input {index=0, name="x"} : f32[4]
        %1 = input {index=1, name="unused"} : f32[4]
        %2 = exp %0 : f32[4]
        %3 = neg %0 : f32[4]
        return %3
    """, """
        %0 = input {index=0, name="x"} : f32[4]
        %1 = input {index=1, name="unused"} : f32[4]
        %2 = neg %0 : f32[4]
        return %2
    """)


def test_cse_shares_identical_nodes():
    check(eliminate_common_subexpressions, """
        %0 = input {index=0, name="x"} : f32[4]
        %1 = exp %0 : f32[4]
        %2 = exp %0 : f32[4]
        %3 = add %1, %2 : f32[4]
        %4 = add %1, %2 : f32[4]
        %5 = mul %3, %4 : f32[4]
        return %5, %4
    """, """
        %0 = input {index=0, name="x"} : f32[4]
        %1 = exp %0 : f32[4]
        %2 = add %1, %1 : f32[4]
        %3 = mul %2, %2 : f32[4]
        return %3, %2
    """)


# --- constant folding ---------------------------------------------------------------------------------

def test_causal_mask_from_iota_folds_to_one_stored_constant():
    result = check(fold_constants, """
        %0 = input {index=0, name="scores"} : f32[2,4,4]
        %1 = iota {axis=0, dtype="i64", shape=[4,4]} : i64[4,4]
        %2 = iota {axis=1, dtype="i64", shape=[4,4]} : i64[4,4]
        %3 = le %2, %1 : bool[4,4]
        %4 = const {value=0.0} : f32[4,4]
        %5 = const {value=-inf} : f32[4,4]
        %6 = where %3, %4, %5 : f32[4,4]
        %7 = add %0, %6 : f32[2,4,4]
        return %7
    """, """
        %0 = input {index=0, name="scores"} : f32[2,4,4]
        %1 = const {key="c0"} : f32[4,4]
        %2 = add %0, %1 : f32[2,4,4]
        return %2
    """)
    np.testing.assert_array_equal(result.tensors["c0"], np.triu(np.full((4, 4), -np.inf, np.float32), 1))


def test_rotary_tables_from_constants_fold_away():
    result = check(fold_constants, """
        %0 = input {index=0, name="q"} : f32[3,4]
        %1 = iota {axis=0, dtype="f32", shape=[3,4]} : f32[3,4]
        %2 = iota {axis=1, dtype="f32", shape=[3,4]} : f32[3,4]
        %3 = const {value=-0.5} : f32[]
        %4 = mul %2, %3 : f32[3,4]
        %5 = const {value=10000.0} : f32[]
        %6 = pow %5, %4 : f32[3,4]
        %7 = mul %1, %6 : f32[3,4]
        %8 = cos %7 : f32[3,4]
        %9 = sin %7 : f32[3,4]
        %10 = mul %0, %8 : f32[3,4]
        %11 = mul %0, %9 : f32[3,4]
        %12 = add %10, %11 : f32[3,4]
        return %12
    """, """
        %0 = input {index=0, name="q"} : f32[3,4]
        %1 = const {key="c0"} : f32[3,4]
        %2 = const {key="c1"} : f32[3,4]
        %3 = mul %0, %1 : f32[3,4]
        %4 = mul %0, %2 : f32[3,4]
        %5 = add %3, %4 : f32[3,4]
        return %5
    """)
    angles = np.arange(3, dtype=np.float32)[:, None] * 10000.0 ** (np.arange(4, dtype=np.float32) * -0.5)
    np.testing.assert_allclose(result.tensors["c0"], np.cos(angles), rtol=1e-6)


def test_splat_arithmetic_folds_to_a_splat_at_any_size():
    check(lambda g: fold_constants(g, max_elements=16), """
        %0 = input {index=0, name="x"} : f32[64,64]
        %1 = const {value=2.0} : f32[]
        %2 = const {value=3.0} : f32[64,64]
        %3 = mul %1, %2 : f32[64,64]
        %4 = expand %1 {shape=[]} : f32[]
        %5 = reshape %4 {shape=[1,1]} : f32[1,1]
        %6 = expand %5 {shape=[64,64]} : f32[64,64]
        %7 = lt %6, %3 : bool[64,64]
        %8 = where %7, %0, %3 : f32[64,64]
        return %8
    """, """
        %0 = input {index=0, name="x"} : f32[64,64]
        %1 = const {value=6.0} : f32[64,64]
        %2 = const {value=true} : bool[64,64]
        %3 = where %2, %0, %1 : f32[64,64]
        return %3
    """)


def test_folding_stops_at_max_elements_and_at_params():
    weights = {"w": np.arange(8, dtype=np.float32).reshape(2, 4)}
    check(lambda g: fold_constants(g, max_elements=8), """
        %0 = input {index=0, name="x"} : f32[2,4]
        %1 = iota {axis=1, dtype="f32", shape=[1,4]} : f32[1,4]
        %2 = expand %1 {shape=[3,4]} : f32[3,4]
        %3 = exp %2 : f32[3,4]
        %4 = sum %3 {axes=[0], keepdim=false} : f32[4]
        %5 = param {name="w"} : f32[2,4]
        %6 = neg %5 : f32[2,4]
        %7 = add %0, %6 : f32[2,4]
        %8 = add %7, %4 : f32[2,4]
        return %8
    """, """
        %0 = input {index=0, name="x"} : f32[2,4]
        %1 = iota {axis=1, dtype="f32", shape=[1,4]} : f32[1,4]
        %2 = expand %1 {shape=[3,4]} : f32[3,4]
        %3 = exp %2 : f32[3,4]
        %4 = sum %3 {axes=[0], keepdim=false} : f32[4]
        %5 = param {name="w"} : f32[2,4]
        %6 = neg %5 : f32[2,4]
        %7 = add %0, %6 : f32[2,4]
        %8 = add %7, %4 : f32[2,4]
        return %8
    """, weights)


def test_stored_constants_fold_and_equal_elements_become_a_splat():
    table = {"t": np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.int64)}
    check(fold_constants, """
        %0 = input {index=0, name="i"} : i64[2]
        %1 = const {key="t"} : i64[2,4]
        %2 = slice %1 {axis=1, start=1, stop=3, step=1} : i64[2,2]
        %3 = slice %1 {axis=0, start=0, stop=1, step=1} : i64[1,4]
        %4 = gt %3, %3 : bool[1,4]
        %5 = reshape %2 {shape=[4]} : i64[4]
        %6 = take %5, %0 {axis=0} : i64[2]
        %7 = cast %4 {dtype="i64"} : i64[1,4]
        return %6, %7
    """, """
        %0 = input {index=0, name="i"} : i64[2]
        %1 = const {key="c0"} : i64[4]
        %2 = take %1, %0 {axis=0} : i64[2]
        %3 = const {value=0} : i64[1,4]
        return %2, %3
    """, table)


# --- canonicalize -------------------------------------------------------------------------------------

def test_canonicalize_reaches_the_fixed_point_of_all_passes():
    check(canonicalize, """
        %0 = input {index=0, name="x"} : f32[1,4,4]
        %1 = iota {axis=0, dtype="i64", shape=[4,4]} : i64[4,4]
        %2 = iota {axis=1, dtype="i64", shape=[4,4]} : i64[4,4]
        %3 = le %2, %1 : bool[4,4]
        %4 = const {value=0.0} : f32[4,4]
        %5 = const {value=-inf} : f32[4,4]
        %6 = where %3, %4, %5 : f32[4,4]
        %7 = reshape %6 {shape=[1,4,4]} : f32[1,4,4]
        %8 = const {value=1.0} : f32[]
        %9 = reshape %0 {shape=[16]} : f32[16]
        %10 = cast %9 {dtype="f64"} : f64[16]
        %11 = cast %10 {dtype="f32"} : f32[16]
        %12 = reshape %11 {shape=[1,4,4]} : f32[1,4,4]
        %13 = mul %12, %8 : f32[1,4,4]
        %14 = add %13, %7 : f32[1,4,4]
        %15 = exp %0 : f32[1,4,4]
        %16 = where %3, %13, %0 : f32[1,4,4]
        %17 = permute %16 {perm=[0,2,1]} : f32[1,4,4]
        %18 = permute %17 {perm=[0,2,1]} : f32[1,4,4]
        %19 = add %14, %18 : f32[1,4,4]
        return %19
    """, """
        %0 = input {index=0, name="x"} : f32[1,4,4]
        %1 = const {key="c0"} : f32[1,4,4]
        %2 = add %0, %1 : f32[1,4,4]
        %3 = add %2, %0 : f32[1,4,4]
        return %3
    """)
