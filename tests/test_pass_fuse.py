"""The fusion pass: IR text in, fused IR text out; a second run changes nothing; the reference backend
computes the same outputs before and after; whole models are in test_fuse_models.py, random programs in
test_pass_fuse_random.py."""
from __future__ import annotations

from textwrap import dedent

import numpy as np
import pytest

from fuse_checks import assert_kernel_contract, assert_same_outputs, kinds, random_inputs
from fusec.ir import Graph
from fusec.verify import verify
from fusec.printer import format_graph, parse_graph
from fusec.passes.fuse import decide, describe, fuse, fusion_stats, matmul_groups, unfuse
from fusec.passes.fusion_rules import Plan

RNG = np.random.default_rng(0)
TENSORS = {name: RNG.standard_normal(shape).astype(np.float32)
           for name, shape in {"w": (4, 8), "v": (6, 8), "b": (4,), "g": (8,)}.items()}


def check(before: str, after: str) -> Graph:
    """Fuse `before`; compare with `after`; check the text parses back, idempotence and numerics."""
    graph = parse_graph(before, TENSORS)
    verify(graph)
    fused = fuse(graph)
    verify(fused)
    assert_kernel_contract(fused)
    assert format_graph(fused) == dedent(after).strip()
    assert parse_graph(format_graph(fused), TENSORS) == fused
    assert format_graph(fuse(fused)) == format_graph(fused), "a second run changed the graph"
    assert_same_outputs(graph, fused, random_inputs(graph))
    return fused


# --- small graphs, golden text ---------------------------------------------------------------------------

def test_an_elementwise_chain_and_its_returned_view_are_one_pointwise_kernel():
    check("""
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = exp %0 : f32[2,8]
        %2 = const {value=2.0} : f32[]
        %3 = mul %1, %2 : f32[2,8]
        %4 = reshape %3 {shape=[16]} : f32[16]
        return %4
    """, """
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = kernel %0 {anchors=[], kind="pointwise", tiles=[]} : f32[16]
          body {
            %0 = input {index=0, name="a0"} : f32[2,8]
            %1 = exp %0 : f32[2,8]
            %2 = const {value=2.0} : f32[]
            %3 = mul %1, %2 : f32[2,8]
            %4 = reshape %3 {shape=[16]} : f32[16]
            return %4
          }
        return %1
    """)


def test_a_returned_view_of_an_input_is_materialized_by_its_own_kernel():
    check("""
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = permute %0 {perm=[1,0]} : f32[8,2]
        return %1, %0
    """, """
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = kernel %0 {anchors=[], kind="pointwise", tiles=[]} : f32[8,2]
          body {
            %0 = input {index=0, name="a0"} : f32[2,8]
            %1 = permute %0 {perm=[1,0]} : f32[8,2]
            return %1
          }
        return %1, %0
    """)


def test_softmax_is_one_reduce_kernel_anchored_at_its_reductions():
    check("""
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = amax %0 {axes=[1], keepdim=true} : f32[2,1]
        %2 = sub %0, %1 : f32[2,8]
        %3 = exp %2 : f32[2,8]
        %4 = sum %3 {axes=[1], keepdim=true} : f32[2,1]
        %5 = div %3, %4 : f32[2,8]
        return %5
    """, """
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = kernel %0 {anchors=[1,4], kind="reduce", tiles=[]} : f32[2,8]
          body {
            %0 = input {index=0, name="a0"} : f32[2,8]
            %1 = amax %0 {axes=[1], keepdim=true} : f32[2,1]
            %2 = sub %0, %1 : f32[2,8]
            %3 = exp %2 : f32[2,8]
            %4 = sum %3 {axes=[1], keepdim=true} : f32[2,1]
            %5 = div %3, %4 : f32[2,8]
            return %5
          }
        return %1
    """)


def test_norm_prologue_matmul_and_bias_relu_epilogue_are_one_matmul_kernel():
    check("""
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = param {name="g"} : f32[8]
        %2 = param {name="w"} : f32[4,8]
        %3 = param {name="b"} : f32[4]
        %4 = mul %0, %0 : f32[2,8]
        %5 = sum %4 {axes=[1], keepdim=true} : f32[2,1]
        %6 = rsqrt %5 : f32[2,1]
        %7 = mul %0, %6 : f32[2,8]
        %8 = mul %7, %1 : f32[2,8]
        %9 = permute %2 {perm=[1,0]} : f32[8,4]
        %10 = matmul %8, %9 : f32[2,4]
        %11 = add %10, %3 : f32[2,4]
        %12 = relu %11 : f32[2,4]
        return %12
    """, """
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = kernel %0 {anchors=[9], kind="matmul", tiles=[]} : f32[2,4]
          body {
            %0 = input {index=0, name="a0"} : f32[2,8]
            %1 = mul %0, %0 : f32[2,8]
            %2 = sum %1 {axes=[1], keepdim=true} : f32[2,1]
            %3 = rsqrt %2 : f32[2,1]
            %4 = mul %0, %3 : f32[2,8]
            %5 = param {name="g"} : f32[8]
            %6 = mul %4, %5 : f32[2,8]
            %7 = param {name="w"} : f32[4,8]
            %8 = permute %7 {perm=[1,0]} : f32[8,4]
            %9 = matmul %6, %8 : f32[2,4]
            %10 = param {name="b"} : f32[4]
            %11 = add %9, %10 : f32[2,4]
            %12 = relu %11 : f32[2,4]
            return %12
          }
        return %1
    """)


def test_matmuls_sharing_a_left_operand_are_one_kernel_with_result_nodes():
    check("""
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = param {name="w"} : f32[4,8]
        %2 = param {name="v"} : f32[6,8]
        %3 = permute %1 {perm=[1,0]} : f32[8,4]
        %4 = matmul %0, %3 : f32[2,4]
        %5 = permute %2 {perm=[1,0]} : f32[8,6]
        %6 = matmul %0, %5 : f32[2,6]
        %7 = tanh %6 : f32[2,6]
        return %4, %7
    """, """
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = kernel %0 {anchors=[3,6], kind="matmul", tiles=[]} : f32[2,4]
          body {
            %0 = input {index=0, name="a0"} : f32[2,8]
            %1 = param {name="w"} : f32[4,8]
            %2 = permute %1 {perm=[1,0]} : f32[8,4]
            %3 = matmul %0, %2 : f32[2,4]
            %4 = param {name="v"} : f32[6,8]
            %5 = permute %4 {perm=[1,0]} : f32[8,6]
            %6 = matmul %0, %5 : f32[2,6]
            %7 = tanh %6 : f32[2,6]
            return %3, %7
          }
        %2 = result %1 {index=0} : f32[2,4]
        %3 = result %1 {index=1} : f32[2,6]
        return %2, %3
    """)


def test_a_matmul_reading_another_is_not_fused_horizontally():
    fused = check("""
        %0 = input {index=0, name="x"} : f32[8,8]
        %1 = input {index=1, name="y"} : f32[8,8]
        %2 = matmul %0, %1 : f32[8,8]
        %3 = matmul %0, %2 : f32[8,8]
        return %3
    """, """
        %0 = input {index=0, name="x"} : f32[8,8]
        %1 = input {index=1, name="y"} : f32[8,8]
        %2 = kernel %0, %1 {anchors=[2], kind="matmul", tiles=[]} : f32[8,8]
          body {
            %0 = input {index=0, name="a0"} : f32[8,8]
            %1 = input {index=1, name="a1"} : f32[8,8]
            %2 = matmul %0, %1 : f32[8,8]
            return %2
          }
        %3 = kernel %0, %2 {anchors=[2], kind="matmul", tiles=[]} : f32[8,8]
          body {
            %0 = input {index=0, name="a0"} : f32[8,8]
            %1 = input {index=1, name="a1"} : f32[8,8]
            %2 = matmul %0, %1 : f32[8,8]
            return %2
          }
        return %3
    """)
    assert kinds(fused) == ["matmul", "matmul"]


CYCLE = """
    %0 = input {index=0, name="x"} : f32[2,8]
    %1 = param {name="v"} : f32[6,8]
    %2 = permute %1 {perm=[1,0]} : f32[8,6]
    %3 = matmul %0, %2 : f32[2,6]
    %4 = sum %3 {axes=[1], keepdim=true} : f32[2,1]
    %5 = sub %3, %4 : f32[2,6]
    %6 = relu %3 : f32[2,6]
    return %5, %6
"""


def test_can_fuse_refuses_a_path_that_leaves_the_group_and_comes_back():
    plan = Plan(parse_graph(CYCLE, TENSORS))
    matmul_groups(plan)
    (group,) = plan.groups
    assert plan.can_fuse(group, 6)       # relu(m): an epilogue
    assert not plan.can_fuse(group, 5)   # m - sum(m): the sum would be another kernel between them
    assert not plan.can_fuse(group, 4)   # a reduction is no matmul epilogue
    assert plan.score(group, 6) == 2 * 6 * 4
    fused = check(CYCLE, format_graph(fuse(parse_graph(CYCLE, TENSORS))))
    assert kinds(fused) == ["matmul", "reduce"]
    assert describe(fused)[1][1] == {"sub": 1, "sum": 1}


def test_an_epilogue_gives_the_next_norms_square_back_to_that_norm():
    check("""
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = input {index=1, name="h"} : f32[2,4]
        %2 = param {name="w"} : f32[4,8]
        %3 = permute %2 {perm=[1,0]} : f32[8,4]
        %4 = matmul %0, %3 : f32[2,4]
        %5 = add %1, %4 : f32[2,4]
        %6 = mul %5, %5 : f32[2,4]
        %7 = sum %6 {axes=[1], keepdim=true} : f32[2,1]
        %8 = rsqrt %7 : f32[2,1]
        %9 = mul %5, %8 : f32[2,4]
        return %9, %5
    """, """
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = input {index=1, name="h"} : f32[2,4]
        %2 = kernel %0, %1 {anchors=[3], kind="matmul", tiles=[]} : f32[2,4]
          body {
            %0 = input {index=0, name="a0"} : f32[2,8]
            %1 = param {name="w"} : f32[4,8]
            %2 = permute %1 {perm=[1,0]} : f32[8,4]
            %3 = matmul %0, %2 : f32[2,4]
            %4 = input {index=1, name="a1"} : f32[2,4]
            %5 = add %4, %3 : f32[2,4]
            return %5
          }
        %3 = kernel %2 {anchors=[2], kind="reduce", tiles=[]} : f32[2,4]
          body {
            %0 = input {index=0, name="a0"} : f32[2,4]
            %1 = mul %0, %0 : f32[2,4]
            %2 = sum %1 {axes=[1], keepdim=true} : f32[2,1]
            %3 = rsqrt %2 : f32[2,1]
            %4 = mul %0, %3 : f32[2,4]
            return %4
          }
        return %3, %2
    """)


ATTENTION = """
    %0 = input {index=0, name="q"} : f32[2,4,8]
    %1 = input {index=1, name="k"} : f32[2,4,8]
    %2 = input {index=2, name="v"} : f32[2,4,8]
    %3 = permute %1 {perm=[0,2,1]} : f32[2,8,4]
    %4 = matmul %0, %3 : f32[2,4,4]
    %5 = const {value=0.5} : f32[]
    %6 = mul %4, %5 : f32[2,4,4]
    %7 = amax %6 {axes=[2], keepdim=true} : f32[2,4,1]
    %8 = sub %6, %7 : f32[2,4,4]
    %9 = exp %8 : f32[2,4,4]
    %10 = sum %9 {axes=[2], keepdim=true} : f32[2,4,1]
    %11 = div %9, %10 : f32[2,4,4]
    %12 = matmul %11, %2 : f32[2,4,8]
    %13 = permute %12 {perm=[1,0,2]} : f32[4,2,8]
    %14 = reshape %13 {shape=[4,16]} : f32[4,16]
    return %14
"""


def test_attention_is_one_kernel_anchored_at_scores_and_output():
    check(ATTENTION, """
        %0 = input {index=0, name="q"} : f32[2,4,8]
        %1 = input {index=1, name="k"} : f32[2,4,8]
        %2 = input {index=2, name="v"} : f32[2,4,8]
        %3 = kernel %0, %1, %2 {anchors=[3,12], kind="attention", tiles=[]} : f32[4,16]
          body {
            %0 = input {index=0, name="a0"} : f32[2,4,8]
            %1 = input {index=1, name="a1"} : f32[2,4,8]
            %2 = permute %1 {perm=[0,2,1]} : f32[2,8,4]
            %3 = matmul %0, %2 : f32[2,4,4]
            %4 = const {value=0.5} : f32[]
            %5 = mul %3, %4 : f32[2,4,4]
            %6 = amax %5 {axes=[2], keepdim=true} : f32[2,4,1]
            %7 = sub %5, %6 : f32[2,4,4]
            %8 = exp %7 : f32[2,4,4]
            %9 = sum %8 {axes=[2], keepdim=true} : f32[2,4,1]
            %10 = div %8, %9 : f32[2,4,4]
            %11 = input {index=2, name="a2"} : f32[2,4,8]
            %12 = matmul %10, %11 : f32[2,4,8]
            %13 = permute %12 {perm=[1,0,2]} : f32[4,2,8]
            %14 = reshape %13 {shape=[4,16]} : f32[4,16]
            return %14
          }
        return %3
    """)


def test_attention_whose_probabilities_are_returned_is_not_one_kernel():
    graph = parse_graph(ATTENTION.replace("return %14", "return %14, %11"), TENSORS)
    fused = fuse(graph)
    assert kinds(fused) == ["matmul", "reduce", "matmul"]
    assert_same_outputs(graph, fused, random_inputs(graph))


def test_unfuse_keeps_reshape_as_a_view_and_copies_weights_into_bodies():
    graph = parse_graph("""
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = param {name="w"} : f32[4,8]
        %2 = exp %0 : f32[2,8]
        %3 = reshape %2 {shape=[2,1,8]} : f32[2,1,8]
        %4 = permute %1 {perm=[1,0]} : f32[8,4]
        %5 = matmul %3, %4 : f32[2,1,4]
        return %5
    """, TENSORS)
    unfused = unfuse(graph)
    assert format_graph(unfused) == dedent("""
        %0 = input {index=0, name="x"} : f32[2,8]
        %1 = kernel %0 {anchors=[], kind="op", tiles=[]} : f32[2,8]
          body {
            %0 = input {index=0, name="a0"} : f32[2,8]
            %1 = exp %0 : f32[2,8]
            return %1
          }
        %2 = reshape %1 {shape=[2,1,8]} : f32[2,1,8]
        %3 = kernel %2 {anchors=[3], kind="op", tiles=[]} : f32[2,1,4]
          body {
            %0 = input {index=0, name="a0"} : f32[2,1,8]
            %1 = param {name="w"} : f32[4,8]
            %2 = permute %1 {perm=[1,0]} : f32[8,4]
            %3 = matmul %0, %2 : f32[2,1,4]
            return %3
          }
        return %3
    """).strip()
    assert fusion_stats(unfused) == {"kernels": 2, "intermediate_bytes": 2 * 8 * 4}
    assert fusion_stats(fuse(graph)) == {"kernels": 1, "intermediate_bytes": 0}
    assert_same_outputs(graph, unfused, random_inputs(graph))


def test_fuse_leaves_existing_kernels_alone():
    graph = parse_graph(CYCLE, TENSORS)
    unfused = unfuse(graph)
    refused = fuse(unfused)
    assert describe(refused) == describe(unfused)
    assert fuse(refused) is refused
    assert_same_outputs(graph, refused, random_inputs(graph))


def test_decide_puts_every_compute_node_in_exactly_one_group():
    plan = decide(parse_graph(ATTENTION, TENSORS))
    members = [m for g in plan.groups for m in g.members]
    assert len(members) == len(set(members))
    assert [g.kind for g in plan.groups] == ["attention"]
