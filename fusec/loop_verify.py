"""The invariants of a `loop` node (built by `passes.loop`), checked by `fusec.ir.verify`.

    %9 = loop %c0, %c1, %x, %kv {trips=3, carried=[0,1], sliced=[3], weights=[[...],[...],[...]]} : t
      body { inputs a0..a3; one iteration; return next a0, next a1, then per-iteration outputs }

Operands carried (`carried`, input indices) have the types of the body's first outputs, their next
values. A sliced operand (`sliced`) has `trips` rows on axis 0, and the body reads row l in iteration l.
The other operands are the same in every iteration. The body's params are named as iteration 0's
weights; `weights[l]` names iteration l's, of the same shapes and dtypes.
"""
from __future__ import annotations

from fusec.errors import IRError
from fusec.ir import Graph, Node, TensorType, verify_body


def loop_input_types(graph: Graph, n: Node) -> list[TensorType]:
    """The types the body's inputs must have, from the loop's operands."""
    sliced = set(n.attr("sliced") or ())
    types = []
    for k, a in enumerate(n.args):
        t = graph.nodes[a].type
        types.append(TensorType(t.shape[1:], t.dtype) if k in sliced else t)
    return types


def verify_loop(graph: Graph, i: int, n: Node) -> None:
    where = f"%{i} = loop"
    body, trips = n.attr("body"), n.attr("trips")
    carried, sliced = tuple(n.attr("carried") or ()), tuple(n.attr("sliced") or ())
    weights = n.attr("weights") or ((),)
    verify_body(where, body)
    if not isinstance(trips, int) or trips < 1 or len(weights) != trips:
        raise IRError(f"{where}: trips={trips} but weights names {len(weights)} iteration(s); expected "
                      "one row of weight names per iteration")
    for k in carried + sliced:
        if not 0 <= k < len(n.args):
            raise IRError(f"{where}: carried/sliced index {k} is not one of its {len(n.args)} operands")
    if len(set(carried + sliced)) != len(carried + sliced):
        raise IRError(f"{where}: an operand is listed twice in carried={list(carried)} sliced={list(sliced)}")
    for k in sliced:
        shape = graph.nodes[n.args[k]].shape
        if not shape or shape[0] != trips:
            raise IRError(f"{where}: sliced operand {k} has shape {list(shape)}, expected {trips} rows on axis 0")
    expected = loop_input_types(graph, n)
    if list(body.input_types) != expected:
        raise IRError(f"{where}: body inputs {[str(t) for t in body.input_types]} do not match operands "
                      f"{[str(t) for t in expected]}")
    if len(body.outputs) < max(len(carried), 1):
        raise IRError(f"{where}: body has {len(body.outputs)} output(s), expected at least one per carried "
                      f"value ({len(carried)})")
    for pos, k in enumerate(carried):
        if body.nodes[body.outputs[pos]].type != expected[k]:
            raise IRError(f"{where}: body output {pos} ({body.nodes[body.outputs[pos]].type}) is not the type "
                          f"of the carried operand {k} ({expected[k]})")
    from fusec.ir import output_types
    if output_types(n)[0] != n.type:
        raise IRError(f"{where}: type {n.type} differs from its output 0 ({output_types(n)[0]})")
    _verify_weights(graph, where, body, weights)


def _verify_weights(graph: Graph, where: str, body: Graph, weights: tuple) -> None:
    """Row 0 names the body's params (in walk order); every row has the same shapes and dtypes."""
    names = list(dict.fromkeys(m.attr("name") for m in body.walk() if m.op == "param"))
    if list(weights[0]) != names:
        raise IRError(f"{where}: weights[0] is {list(weights[0])[:4]}..., expected the body's params "
                      f"{names[:4]}...")
    for t, row in enumerate(weights):
        if len(row) != len(names):
            raise IRError(f"{where}: iteration {t} names {len(row)} weights, expected {len(names)}")
        for name, first in zip(row, names):
            if name not in graph.tensors:
                raise IRError(f"{where}: parameter {name!r} of iteration {t} has no tensor")
            a, b = graph.tensors[name], graph.tensors[first]
            if tuple(a.shape) != tuple(b.shape) or str(a.dtype) != str(b.dtype):
                raise IRError(f"{where}: parameter {name!r} of iteration {t} is {list(a.shape)} {a.dtype}, "
                              f"expected {list(b.shape)} {b.dtype} like {first!r} of iteration 0")
