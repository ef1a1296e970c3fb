"""Run-time sizes of a symbolic program: bind the size variables from a call's inputs, check them against
their bounds, and specialize a graph to concrete sizes.

A symbolic graph (`fusec.symbolic`) means, at sizes S, the static graph `specialize(graph, S)`: every
type and attribute evaluated at S. The reference backend runs exactly that; the Numba backend runs
code compiled once for every S in the bounds (`backends.numba_cpu.sizes`) and must agree with it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from fusec.errors import FusecError
from fusec.ir import Graph, Node, TensorType
from fusec.symbolic import Sym, evaluate, substitute


class SizeError(FusecError, ValueError):
    """An input whose symbolic size is outside its bounds or disagrees with another input."""


def size_slots(graph: Graph) -> dict[str, tuple[int, int]]:
    """{variable: (input position, axis)} where each size variable appears bare in an input's shape: the
    inputs it is read from at run time. SizeError names a variable no input gives alone."""
    slots: dict[str, tuple[int, int]] = {}
    for pos, i in enumerate(graph.inputs):
        for axis, d in enumerate(graph.nodes[i].shape):
            if isinstance(d, Sym) and len(d.terms) == 1 and d.terms[0] == ((d.names[0],), 1):
                slots.setdefault(d.names[0], (pos, axis))
    missing = sorted(set(graph.sizes) - set(slots))
    if missing:
        raise SizeError(f"size variable(s) {', '.join(missing)} appear in no input's shape on their own, "
                        "so a call cannot give their values")
    return slots


def bind_sizes(graph: Graph, shapes: Sequence[tuple[int, ...]], names: Sequence[str] | None = None,
               slots: Mapping[str, tuple[int, int]] | None = None,
               bounds: Mapping[str, tuple[int, int]] | None = None) -> dict[str, int]:
    """The value of every size variable for inputs of these shapes (in `graph.inputs` order), checked:
    each within its bounds and every input's every dimension equal to its declared size. SizeError names
    the input, the dimension, the bounds and the value. (`slots` and `bounds`: `size_slots(graph)` and
    `graph.sizes`, when the caller keeps them.)"""
    bounds = graph.sizes if bounds is None else bounds
    if not bounds:
        return {}
    slots = size_slots(graph) if slots is None else slots
    names = names or [graph.nodes[i].attr("name") or f"input {k}" for k, i in enumerate(graph.inputs)]
    if len(shapes) != len(graph.inputs):
        raise SizeError(f"the program takes {len(graph.inputs)} input(s), got {len(shapes)}")
    sizes: dict[str, int] = {}
    for var, (pos, axis) in slots.items():
        lo, hi = bounds[var]
        shape = shapes[pos]
        value = shape[axis] if axis < len(shape) else None
        if value is None or not lo <= value <= hi:
            raise SizeError(f"input {names[pos]!r} dimension {axis} is the size {var}, which must be in "
                            f"[{lo}, {hi}]; got {value} (shape {list(shape)})")
        sizes[var] = int(value)
    for pos, i in enumerate(graph.inputs):
        want = graph.nodes[i].shape
        got = tuple(shapes[pos])
        if len(got) != len(want) or any(g != evaluate(w, sizes) for g, w in zip(got, want)):
            expected = [evaluate(w, sizes) for w in want]
            raise SizeError(f"input {names[pos]!r} has shape {list(got)}; with "
                            f"{', '.join(f'{k}={v}' for k, v in sorted(sizes.items()))} it must be {expected} "
                            f"(declared {TensorType(want, graph.nodes[i].dtype)})")
    return sizes


def specialize(graph: Graph, sizes: Mapping[str, int]) -> Graph:
    """The static graph of `graph` at these sizes: every type and attribute evaluated (bodies too)."""
    if not sizes:
        return graph
    nodes = tuple(_node(n, sizes) for n in graph.nodes)
    return replace(graph, nodes=nodes, annotations={})


def _node(n: Node, sizes: Mapping[str, int]) -> Node:
    attrs = tuple((k, specialize(v, sizes) if isinstance(v, Graph) else substitute(v, sizes)) for k, v in n.attrs)
    return Node(n.op, n.args, attrs, TensorType(substitute(n.type.shape, sizes), n.type.dtype), n.origin)


def upper_sizes(graph: Graph) -> dict[str, int]:
    """Every size variable at its upper bound (what buffers are planned for)."""
    return {k: hi for k, (lo, hi) in graph.sizes.items()}


def describe(sizes: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(sizes.items()))


def runs_symbolic(graph: Graph, shapes: Sequence[tuple[int, ...]], names: Sequence[str],
                  declared: Mapping[tuple[int, int], tuple[int, int] | None]) -> bool:
    """Whether the symbolic program `graph` runs a call with inputs of these shapes (tensor inputs in
    order). False when a size lies outside the range torch.export found for a dimension given without
    bounds (that call gets a program of its own, as Dynamo does for sizes it specializes); SizeError when
    outside bounds the user declared, `declared[(input, axis)] = (lo, hi)`."""
    try:
        bind_sizes(graph, shapes, names)
        return True
    except SizeError:
        for (pos, axis), bounds in declared.items():
            if bounds is not None and not bounds[0] <= shapes[pos][axis] <= bounds[1]:
                raise
        return False


def concrete(graph: Graph, sizes: int | Mapping[str, int] | None = None) -> Graph:
    """A symbolic graph at concrete sizes, for reports that need numbers (the RDU model's placement,
    `fusec dump --dynamic --seq-len N`): `sizes` a mapping, one int for every variable (a sequence
    length), or None for the upper bounds. SizeError names a size outside its bounds."""
    bounds = graph.sizes
    if not bounds:
        return graph
    if sizes is None:
        sizes = upper_sizes(graph)
    elif isinstance(sizes, int):
        sizes = {k: sizes for k in bounds}
    for k, (lo, hi) in bounds.items():
        if k not in sizes or not lo <= sizes[k] <= hi:
            raise SizeError(f"the size {k} must be in [{lo}, {hi}]; given {sizes.get(k)}")
    return specialize(graph, sizes)
