"""Checks shared by the fusion tests: the kinds of a fused program's kernels, the kernel contract, and
random inputs on which a program and its fused form must agree."""

from __future__ import annotations

import numpy as np

from fusec.backends.reference import run_graph
from fusec.ir import Graph
from fusec.opset import OPS
from fusec.passes.fuse import describe


def kinds(graph: Graph) -> list[str]:
    return [kind for kind, _ in describe(graph)]


def assert_kernel_contract(graph: Graph) -> None:
    """Only inputs, kernels and results outside; each body has its kind's form (fusec/kernels.py)."""
    for n in graph.nodes:
        assert n.op in ("input", "kernel", "result")
        if n.op != "kernel":
            continue
        assert all(graph.nodes[a].op in ("input", "kernel", "result") for a in n.args)  # activations only
        body, kind, anchors = n.attr("body"), n.attr("kind"), n.attr("anchors")
        lattice = [OPS[b.op] for b in body.nodes]
        ids = {k: tuple(i for i, x in enumerate(lattice) if x == k) for k in ("reduce", "matmul")}
        if kind == "pointwise":
            assert set(lattice) <= {"source", "elementwise", "layout", "gather"}
            assert len({body.nodes[o].shape for o in body.outputs}) == 1
        elif kind == "reduce":
            assert "matmul" not in lattice and ids["reduce"] == anchors != ()
            assert len({(body.nodes[body.nodes[r].args[0]].shape, body.nodes[r].attr("axes"),
                         body.nodes[r].attr("keepdim")) for r in anchors}) == 1
        elif kind == "matmul":  # horizontal: one left operand
            assert ids["matmul"] == anchors != () and len({body.nodes[m].args[0] for m in anchors}) == 1
        else:
            assert kind == "attention" and ids["matmul"] == anchors and len(anchors) == 2


def random_inputs(graph: Graph, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(t.shape).astype(np.float32) for t in graph.input_types]


def assert_same_outputs(want: Graph, got: Graph, inputs: list) -> None:
    for a, b in zip(run_graph(want, inputs), run_graph(got, inputs), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
