"""Canonicalization: dead code, common subexpressions, constant folding, algebra and view simplification.

Every pass takes a verified graph and returns a verified graph that computes the same outputs from the
same inputs (same signature: `input` nodes are never removed). `canonicalize` runs them to a fixed point.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Any

import numpy as np

from fusec.debug import debug
from fusec.dtypes import to_numpy
from fusec.ir import DTYPES, Graph, Node, TensorType, make_attrs, prune
from fusec.opset import OPS
from fusec.printer import format_graph
from fusec.semantics import eval_node
from fusec.symbolic import is_static
from fusec.passes.ranges import simplify_ranges
from fusec.passes.rewrite import Ctx, Rule, rewrite


def eliminate_dead_code(graph: Graph) -> Graph:
    """Expects any graph; guarantees every node is needed by an output, except `input` nodes (the
    signature never changes), and `tensors` holds only what the remaining params and consts name."""
    return prune(graph)


def eliminate_common_subexpressions(graph: Graph) -> Graph:
    """Expects a verified graph; guarantees no two nodes are identical (same op, operands, attributes and
    type), by rebuilding through the hash-consing Builder. Also drops dead nodes, as every rewrite does."""
    return rewrite(graph, ())


# --- constant folding ---------------------------------------------------------------------------------

CONSTANT_OPS = ("const", "iota")  # `param` is not a constant: weights stay references to their storage
FOLDABLE = tuple(op for op, k in OPS.items() if k not in ("source", "kernel"))


def _splat_value(arr: np.ndarray) -> Any:
    """The Python value every element of `arr` equals (sign of zero included), or None."""
    flat = arr.reshape(-1)
    if flat.size == 0 or not (flat == flat[0]).all():
        return None
    if flat.dtype.kind == "f" and not (np.signbit(flat) == np.signbit(flat[0])).all():
        return None
    return flat[0].item()


def _fold(c: Ctx, *args: int, max_elements: int) -> int | None:
    n = c.n
    if not args or not all(c.node(a).op in CONSTANT_OPS for a in args):
        return None
    if all(c.is_const(a) for a in args):
        values = [c.node(a).attr("value") for a in args]
        if OPS[n.op] == "layout" and len({repr(v) for v in values}) == 1:  # repr: tells -0.0, keeps nan
            return c.const(values[0], n.dtype, n.shape)  # moving a splat around gives the same splat
        if OPS[n.op] == "elementwise":  # evaluate one element, whatever the shape
            scalars = [np.full((), v, to_numpy(c.node(a).dtype)) for v, a in zip(values, args)]
            value = eval_node(Node(n.op, n.args, n.attrs, TensorType((), n.dtype)), scalars, c.b.tensors)
            return c.const(value.item(), n.dtype, n.shape)
    if not is_static(n.shape) or not all(is_static(c.type(a).shape) for a in args):
        return None  # an array whose size is known only at run time (an iota of a symbolic length)
    if max(n.type.numel, *(c.type(a).numel for a in args)) > max_elements:
        return None
    out = eval_node(n, [eval_node(c.node(a), [], c.b.tensors) for a in args], c.b.tensors)
    value = _splat_value(out)
    return c.b.const_array(out, n.dtype) if value is None else c.const(value, n.dtype, n.shape)


def fold_constants(graph: Graph, max_elements: int = 1 << 22) -> Graph:
    """Evaluate every node whose operands are all constants (`const`, `iota`, or folded before) with the
    reference semantics (`fusec.semantics`) and replace it by a `const`: a splat when all elements are
    equal, else a stored array. Expects a verified graph; guarantees that no foldable node is left with only constant
    operands, except those whose result or operands exceed `max_elements` (a huge expand). Splat
    arithmetic and moving splats around fold at any size, since they never materialize an array.
    """
    rule: Rule = (FOLDABLE, lambda c, *args: _fold(c, *args, max_elements=max_elements))
    return _name_new_arrays(rewrite(graph, (rule,)), set(graph.tensors))


def _name_new_arrays(graph: Graph, old_keys: set[str]) -> Graph:
    """Name the arrays folding stored c0, c1, ... in node order. The builder's names count every
    intermediate array stored on the way, so without this the printed graph would depend on them."""
    rename: dict[str, str] = {}
    for node in graph.nodes:
        key = node.attr("key") if node.op == "const" else None
        if key is not None and key not in old_keys and key not in rename:
            rename[key] = next(f"c{i}" for i in itertools.count(len(rename))
                               if f"c{i}" not in old_keys and f"c{i}" not in rename.values())
    if not rename:
        return graph
    nodes = tuple(replace(n, attrs=make_attrs({**dict(n.attrs), "key": rename[n.attr("key")]}))
                  if n.attr("key") in rename else n for n in graph.nodes)
    return Graph(nodes, graph.outputs, {rename.get(k, k): v for k, v in graph.tensors.items()})


# --- algebra ------------------------------------------------------------------------------------------

# dtype -> the dtypes that hold every one of its values exactly (a cast there and back is the identity)
_EXACT: dict[str, tuple[str, ...]] = {
    "bool": DTYPES,
    "u8": ("u8", "i16", "i32", "i64", "f16", "bf16", "f32", "f64"),
    "i8": ("i8", "i16", "i32", "i64", "f16", "bf16", "f32", "f64"),
    "i16": ("i16", "i32", "i64", "f32", "f64"),
    "i32": ("i32", "i64", "f64"),
    "i64": ("i64",),
    "f16": ("f16", "f32", "f64"),
    "bf16": ("bf16", "f32", "f64"),
    "f32": ("f32", "f64"),
    "f64": ("f64",),
}


def _cast_of_cast(c: Ctx, x: int) -> int | None:
    inner = c.node(x)
    if inner.op != "cast" or inner.dtype not in _EXACT[c.type(inner.args[0]).dtype]:
        return None
    return c.add("cast", inner.args, {"dtype": c.n.dtype})


def _is_zero(c: Ctx, x: int, sign: int) -> bool:
    """`x` is a splat zero that adds (sign -1: -0.0) or subtracts (sign +1: +0.0) as the identity. A float
    +0.0 is not the identity of `add`: -0.0 + 0.0 is +0.0 (and 1 / that is +inf, as in eager)."""
    if not c.is_const(x, 0):
        return False
    value = c.node(x).attr("value")
    return not isinstance(value, float) or (math.copysign(1.0, value) < 0) == (sign < 0)


def _inner(c: Ctx, x: int, op: str) -> int | None:
    """The operand of `x` when `x` is a unary `op`, else None."""
    return c.node(x).args[0] if c.is_op(x, op) else None


ALGEBRA_RULES: tuple[Rule, ...] = (
    ("cast", lambda c, x: x if c.same_type(x) else None),                    # cast(x: t, t) -> x
    ("cast", _cast_of_cast),                        # cast(cast(x, wider), t) -> cast(x, t), then maybe x
    ("mul", lambda c, x, y: x if c.is_const(y, 1) and c.same_type(x) else None),   # x*1 -> x
    ("mul", lambda c, x, y: y if c.is_const(x, 1) and c.same_type(y) else None),   # 1*x -> x
    ("div", lambda c, x, y: x if c.is_const(y, 1) and c.same_type(x) else None),   # x/1 -> x
    ("add", lambda c, x, y: x if _is_zero(c, y, -1) and c.same_type(x) else None),  # x+(-0) -> x
    ("add", lambda c, x, y: y if _is_zero(c, x, -1) and c.same_type(y) else None),  # (-0)+x -> x
    ("sub", lambda c, x, y: x if _is_zero(c, y, +1) and c.same_type(x) else None),  # x-(+0) -> x
    ("where", lambda c, m, x, y: x if x == y and c.same_type(x) else None),        # where(m, x, x) -> x
    ("where", lambda c, m, x, y: x if c.is_const(m, True) and c.same_type(x) else None),   # where(T, x, y) -> x
    ("where", lambda c, m, x, y: y if c.is_const(m, False) and c.same_type(y) else None),  # where(F, x, y) -> y
    ("neg", lambda c, x: _inner(c, x, "neg")),                               # -(-x) -> x
    ("not", lambda c, x: _inner(c, x, "not")),                               # not(not x) -> x
)


def simplify_algebra(graph: Graph) -> Graph:
    """Remove arithmetic that does nothing (`ALGEBRA_RULES`). A rule only replaces a node by one of the
    same type, so an identity that broadcasts (`x[4] + zeros[3,4]`) stays. Expects a verified graph.
    """
    return rewrite(graph, ALGEBRA_RULES)


# --- views --------------------------------------------------------------------------------------------

def _compose_permutes(c: Ctx, x: int) -> int | None:
    if not c.is_op(x, "permute"):
        return None
    inner, outer = c.node(x).attr("perm"), c.n.attr("perm")
    return c.add("permute", c.node(x).args, {"perm": tuple(inner[p] for p in outer)})


def _compose_slices(c: Ctx, x: int) -> int | None:
    inner, outer = c.node(x), c.n
    if inner.op != "slice" or inner.attr("axis") != outer.attr("axis") or outer.shape[outer.attr("axis")] == 0:
        return None
    step = inner.attr("step") * outer.attr("step")
    start = inner.attr("start") + outer.attr("start") * inner.attr("step")
    stop = start + (outer.shape[outer.attr("axis")] - 1) * step + 1
    return c.add("slice", inner.args, {"axis": outer.attr("axis"), "start": start, "stop": stop, "step": step})


def _merge(c: Ctx, x: int) -> int | None:
    """reshape(reshape(y)) -> reshape(y), expand(expand(y)) -> expand(y): the outer shape is all that counts."""
    return c.add(c.n.op, c.node(x).args, {"shape": c.n.shape}) if c.is_op(x, c.n.op) else None


VIEW_RULES: tuple[Rule, ...] = (
    (("reshape", "expand", "slice"), lambda c, x: x if c.same_type(x) else None),   # view(x: s) : s -> x
    (("reshape", "expand"), _merge),                          # reshape(reshape(x, s1), s2) -> reshape(x, s2)
    ("permute", lambda c, x: x if c.n.attr("perm") == tuple(range(c.n.type.rank)) else None),  # x.T(id) -> x
    ("permute", _compose_permutes),                           # permute(permute(x, p), q) -> permute(x, p[q])
    ("slice", _compose_slices),                               # x[a:b:s][c:d:t] -> x[a+c*s : .. : s*t]
    ("concat", lambda c, *xs: xs[0] if len(xs) == 1 else None),                     # concat(x) -> x
)


def simplify_views(graph: Graph) -> Graph:
    """Remove layout ops that do nothing and merge chains of the same layout op (`VIEW_RULES`).
    Expects a verified graph; guarantees no identity reshape/permute/expand/slice/concat and no
    reshape-of-reshape, permute-of-permute, expand-of-expand or slice-of-slice on one axis remains.
    """
    return rewrite(graph, VIEW_RULES)


# --- all of it ----------------------------------------------------------------------------------------

PASSES = (eliminate_dead_code, eliminate_common_subexpressions, fold_constants, simplify_algebra,
          simplify_views, simplify_ranges)


def canonicalize(graph: Graph, max_rounds: int = 10) -> Graph:
    """Run every canonicalization pass in order until the printed graph stops changing (at most
    `max_rounds` rounds). Guarantees what each pass guarantees, at once, when it converges.
    """
    text, old_keys = format_graph(graph), set(graph.tensors)
    for _ in range(max_rounds):
        for run in PASSES:
            graph = run(graph)
        new = format_graph(graph)
        if new == text:
            break
        text = new
    else:
        debug(1, f"[fusec] canonicalize: still changing after {max_rounds} rounds; stopped there")
    return _name_new_arrays(graph, old_keys)
