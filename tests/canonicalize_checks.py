"""Shared by the canonicalization tests: run a pass on IR text, compare with the expected text, check
that a second run changes nothing and that the reference backend computes the same outputs before and
after."""
from __future__ import annotations

from textwrap import dedent
from typing import Callable

import numpy as np

from fusec.backends.reference import run_graph
from fusec.dtypes import to_numpy
from fusec.ir import Graph
from fusec.printer import format_graph, parse_graph
from fusec.verify import verify


def random_inputs(graph: Graph, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for t in graph.input_types:
        if t.dtype == "bool":
            out.append(rng.random(t.shape) > 0.5)
        elif t.dtype.startswith(("i", "u")):
            out.append(rng.integers(0, 4, t.shape).astype(to_numpy(t.dtype)))
        else:
            out.append(rng.standard_normal(t.shape).astype(to_numpy(t.dtype)))
    return out


def check(run: Callable[[Graph], Graph], before: str, after: str, tensors: dict | None = None) -> Graph:
    """Run the pass on `before`; compare with `after`; check idempotence and numerics; return the result."""
    graph = parse_graph(before, tensors)
    verify(graph)
    result = run(graph)
    verify(result)
    assert format_graph(result) == dedent(after).strip()
    assert format_graph(run(result)) == format_graph(result), "a second run changed the graph"
    inputs = random_inputs(graph)
    for want, got in zip(run_graph(graph, inputs), run_graph(result, inputs)):
        np.testing.assert_array_equal(got, want)
    return result
