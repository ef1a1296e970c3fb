"""The fusion pass on random programs: every fused program verifies, keeps the kernel contract, is a
fixed point of a second run, and computes what the unfused program computes (fused, unfused, refused)."""
from __future__ import annotations

import numpy as np
import pytest

from fuse_checks import assert_kernel_contract, assert_same_outputs, random_inputs
from fusec.ir import Builder, Graph, TensorType
from fusec.passes.fuse import fuse, unfuse
from fusec.printer import format_graph
from fusec.verify import verify


def random_graph(seed: int) -> Graph:
    """A random program over [4, 8] values: elementwise ops, row reductions, matmuls with weights and
    activations, softmax attention, relayouts, masks, column reductions and returned views."""
    rng = np.random.default_rng(seed)
    b = Builder({"w": rng.standard_normal((8, 8)).astype(np.float32)})
    values = [b.add("input", (), {"index": i, "name": f"x{i}"}, TensorType((4, 8), "f32"))
              for i in range(rng.integers(1, 4))]
    weight = b.add("param", (), {"name": "w"}, TensorType((8, 8), "f32"))
    outputs = []
    for _ in range(rng.integers(3, 20)):
        x, y = (values[int(k)] for k in rng.integers(0, len(values), 2))
        step = rng.integers(0, 9)
        if step == 0:
            v = b.add(["add", "mul", "sub", "max"][rng.integers(0, 4)], [x, y])
        elif step == 1:
            v = b.add(["exp", "neg", "tanh", "sigmoid"][rng.integers(0, 4)], [x])
        elif step == 2:
            red = b.add(["sum", "amax"][rng.integers(0, 2)], [x], {"axes": (1,), "keepdim": True})
            v = b.add(["sub", "div", "mul"][rng.integers(0, 3)], [x, red])
        elif step == 3:
            rhs = b.add("permute", [weight], {"perm": (1, 0)}) if rng.random() < 0.5 else weight
            v = b.add("matmul", [x, rhs])
        elif step == 4:  # softmax(x y^T) z
            s = b.add("matmul", [x, b.add("permute", [y], {"perm": (1, 0)})])
            e = b.add("exp", [b.add("sub", [s, b.add("amax", [s], {"axes": (1,), "keepdim": True})])])
            p = b.add("div", [e, b.add("sum", [e], {"axes": (1,), "keepdim": True})])
            v = b.add("matmul", [p, values[int(rng.integers(0, len(values)))]])
        elif step == 5:
            v = b.add("reshape", [b.add("exp", [b.add("permute", [x], {"perm": (1, 0)})])], {"shape": (4, 8)})
        elif step == 6:
            v = b.add("where", [b.add("gt", [x, y]), x, b.const(float("-inf"), "f32")])
        elif step == 7:
            v = b.add("add", [x, b.add("sum", [x], {"axes": (0,), "keepdim": True})])
        else:
            half = b.add("slice", [x], {"axis": 1, "start": 0, "stop": 4, "step": 1})
            v = b.add("concat", [half, b.add("neg", [half])], {"axis": 1})
            if rng.random() < 0.3:
                outputs.append(b.add("reshape", [v], {"shape": (32,)}))
        values.append(v)
    picks = rng.choice(len(values), size=min(3, len(values)), replace=False)
    return b.finish(outputs + [values[int(k)] for k in picks])


@pytest.mark.parametrize("seed", range(0, 400, 4))
def test_random_programs_fuse_legally_and_compute_the_same(seed):
    graph = random_graph(seed)
    fused = fuse(graph)
    verify(fused)
    assert_kernel_contract(fused)
    assert format_graph(fuse(fused)) == format_graph(fused)
    inputs = random_inputs(graph, seed)
    assert_same_outputs(graph, fused, inputs)
    assert_same_outputs(graph, unfuse(graph), inputs)
    assert_same_outputs(graph, fuse(unfuse(graph)), inputs)
