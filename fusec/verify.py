"""`verify`: the invariants every pass keeps, checked on a whole graph, kernel and loop bodies included.

It sits above the graph (`fusec.ir`) and the op set's type rules (`fusec.opset`) and takes both from
there. A `loop` node (built by `passes.loop`) has this form:

    %9 = loop %c0, %c1, %x, %kv {trips=3, carried=[0,1], sliced=[3], weights=[[...],[...],[...]]} : t
      body { inputs a0..a3; one iteration; return next a0, next a1, then per-iteration outputs }

Operands carried (`carried`, input indices) have the types of the body's first outputs, their next
values. A sliced operand (`sliced`) has `trips` rows on axis 0, and the body reads row l in iteration l.
The other operands are the same in every iteration. The body's params are named as iteration 0's
weights; `weights[l]` names iteration l's, of the same shapes and dtypes.
"""
from __future__ import annotations

import math
import weakref

from fusec.errors import IRError
from fusec.ir import Graph, Node, TensorType, output_types
from fusec.opset import OPS, infer


def verify(graph: Graph) -> None:
    """Check the invariants every pass must keep; raise IRError naming the first broken one."""
    graph.sizes  # noqa: B018 - raises when a size variable has two bounds
    seen_inputs = set()
    for i, n in enumerate(graph.nodes):
        where = f"%{i} = {n.op}"
        if n.op not in OPS:
            raise IRError(f"{where}: unknown op")
        for a in n.args:
            if not 0 <= a < i:
                raise IRError(f"{where}: operand %{a} is not an earlier node")
        operand_types = [graph.nodes[a].type for a in n.args]
        if not _type_fits(n, operand_types):
            expected = infer(n.op, operand_types, dict(n.attrs), n.type)
            raise IRError(f"{where}: type is {n.type} but its operands give {expected}")
        if n.op == "kernel":
            _verify_kernel(graph, i, n)
        if n.op == "loop":
            verify_loop(graph, i, n)
        if n.op == "result":
            of = graph.nodes[n.args[0]] if len(n.args) == 1 else None
            types = output_types(of) if of is not None and of.op in ("kernel", "loop") else []
            if not 0 <= n.attr("index", -1) < len(types):
                raise IRError(f"{where}: must read an existing output of a kernel or loop node")
            if types[n.attr("index")] != n.type:
                raise IRError(f"{where}: type {n.type} differs from the {of.op}'s output {n.attr('index')}")
        if n.op == "input":
            idx = n.attr("index")
            if idx in seen_inputs:
                raise IRError(f"{where}: input index {idx} appears twice")
            seen_inputs.add(idx)
        if n.op == "param" and n.attr("name") not in graph.tensors:
            raise IRError(f"{where}: parameter {n.attr('name')!r} has no tensor")
        if n.op == "const" and n.attr("key") is not None and n.attr("key") not in graph.tensors:
            raise IRError(f"{where}: constant {n.attr('key')!r} has no array")
    if sorted(seen_inputs) != list(range(len(seen_inputs))):
        raise IRError(f"input indices are {sorted(seen_inputs)}, expected 0..{len(seen_inputs) - 1}")
    for o in graph.outputs:
        if not 0 <= o < len(graph.nodes):
            raise IRError(f"output %{o} does not exist")


# Bodies found valid, by identity. A graph is immutable and a pass keeps most kernel bodies as they were,
# so the pipeline, verifying after every pass, checks each body once instead of once per pass (that was
# a third of the passes' time). Weak: a body no longer used is forgotten, and its id cannot be mistaken
# for a new graph's.
_VALID_BODIES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


# Type checks that passed: (op, attributes, operand types, type) of a node. The passes verify after each
# of them, a graph keeps most nodes, and a model's layers repeat the same nodes: each distinct node is
# inferred once (type inference of symbolic shapes was most of what verifying took).
_TYPES_FIT: set = set()
_TYPES_FIT_LIMIT = 1 << 16  # entries kept before starting over (a bound on memory, not a tuning knob)


def _type_fits(n: Node, operand_types: list[TensorType]) -> bool:
    """Whether node `n`'s declared type is what its op gives for these operands; IRError as `infer` when
    they do not fit the op at all."""
    def fits() -> bool:
        return infer(n.op, operand_types, dict(n.attrs), n.type) == n.type

    if n.op in ("kernel", "loop", "result", "extern"):  # typed by their builder: nothing to infer
        return fits()
    try:
        key = (n.op, _exact(n.attrs), tuple(operand_types), n.type)
        known = key in _TYPES_FIT
    except TypeError:  # an attribute that cannot be hashed: checked every time
        return fits()
    if known:
        return True
    if not fits():
        return False
    if len(_TYPES_FIT) >= _TYPES_FIT_LIMIT:
        _TYPES_FIT.clear()
    _TYPES_FIT.add(key)
    return True


def _exact(value):
    """`value` keyed so that only equal values of one type meet: 1, 1.0 and True compare equal in Python,
    and so do 0.0 and -0.0."""
    if isinstance(value, tuple):
        return tuple(_exact(v) for v in value)
    if isinstance(value, float):
        return (float, value, math.copysign(1.0, value))
    return (type(value), value)


def verify_body(where: str, body) -> None:
    """The nested graph of a kernel or loop node (`where` names it) exists and is valid."""
    if not isinstance(body, Graph):
        raise IRError(f"{where}: has no body graph")
    if _VALID_BODIES.get(id(body)) is body:
        return
    try:
        verify(body)
    except IRError as e:
        raise IRError(f"{where}: body: {e}") from e
    _VALID_BODIES[id(body)] = body


def _verify_kernel(graph: Graph, i: int, n: Node) -> None:
    """A kernel's body is a valid graph whose inputs match the kernel's operands and whose output 0 is
    the kernel's type."""
    body = n.attr("body")
    where = f"%{i} = kernel {n.attr('kind')}"
    verify_body(where, body)
    arg_types = tuple(graph.nodes[a].type for a in n.args)
    if body.input_types != arg_types:
        raise IRError(f"{where}: body inputs {[str(t) for t in body.input_types]} do not match operands "
                      f"{[str(t) for t in arg_types]}")
    if not body.outputs or body.nodes[body.outputs[0]].type != n.type:
        raise IRError(f"{where}: type {n.type} differs from its body's output 0")


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
