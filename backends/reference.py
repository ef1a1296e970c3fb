"""The NumPy reference backend: runs a graph op by op with the reference semantics (`fusec.semantics`,
which defines what every op computes and lists the semantic decisions beyond "what NumPy does").

`run_graph` runs a whole graph; `compile_graph` is the backend contract (`compile(graph) -> callable`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from fusec.ir import Graph
from fusec.semantics import TakeIndexError, eval_node, evaluate_graph  # noqa: F401 - re-exported
from fusec.sizes import bind_sizes, specialize


def run_graph(graph: Graph, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Evaluate every node in order and return the outputs; a value is dropped after its last use.

    `inputs` are in the order of `graph.inputs` and must match their declared shapes and dtypes
    (torch tensors are accepted and viewed without a copy). A graph with symbolic sizes runs as the static
    graph at the sizes the inputs give (`fusec.sizes`: checked against their bounds, SizeError if not).
    """
    if graph.sizes:
        graph = specialize(graph, bind_sizes(graph, [np.shape(x) for x in inputs]))
    return evaluate_graph(graph, inputs, graph.tensors)


def compile_graph(graph: Graph) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """The backend contract: a callable running `graph` on the reference backend."""
    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        return run_graph(graph, inputs)
    run.graph = graph  # type: ignore[attr-defined]
    return run
