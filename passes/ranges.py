"""Range algebra: `iota` (an arange along one axis) through views and integer arithmetic, so that position
bookkeeping built from a symbolic length folds to constants as a static graph's would.

A static graph folds `arange(T)` and everything computed from it at trace time. With a symbolic T the
`iota` stays, and so does what models compute from positions: Hugging Face's mask builder takes
`diff(position_ids)` (with a prepended first value minus one), compares it with 1 and runs a `cumsum`
and an advanced index over the result, which would otherwise call PyTorch on every run. These rules keep
an iota an iota through slices, unit reshapes, integer offsets and concatenation, fold the difference of
two aligned iotas to a splat, and fold the two PyTorch ops once their operand is a splat.
"""
from __future__ import annotations

from fusec.ir import Graph
from fusec.passes.rewrite import Ctx, Rule, rewrite

INTEGER = ("i8", "u8", "i16", "i32", "i64")


def _iota(c: Ctx, x: int):
    n = c.node(x)
    return n if n.op == "iota" else None


def _with(c: Ctx, like, start, step, axis=None) -> int:
    """An iota of the node being rewritten's type: `start`, `step` along `axis` (default `like`'s)."""
    return c.add("iota", (), {"shape": c.n.shape, "axis": like.attr("axis") if axis is None else axis,
                              "start": start, "step": step, "dtype": c.n.dtype})


def _slice(c: Ctx, x: int) -> int | None:
    """iota[a:b:s] along its axis starts at start + a*step with step*s; along another axis it is unchanged."""
    it = _iota(c, x)
    if it is None:
        return None
    axis, step = it.attr("axis") % it.type.rank, it.attr("step", 1)
    if c.n.attr("axis") % it.type.rank != axis:
        return _with(c, it, it.attr("start", 0), step)
    return _with(c, it, it.attr("start", 0) + c.n.attr("start") * step, step * c.n.attr("step"))


def _reshape(c: Ctx, x: int) -> int | None:
    """A reshape that only adds or drops dimensions of size 1 keeps the iota, on the axis it moved to."""
    it = _iota(c, x)
    if it is None:
        return None
    old = [i for i, d in enumerate(it.shape) if not (isinstance(d, int) and d == 1)]
    new = [i for i, d in enumerate(c.n.shape) if not (isinstance(d, int) and d == 1)]
    axis = it.attr("axis") % it.type.rank
    if [it.shape[i] for i in old] != [c.n.shape[i] for i in new] or axis not in old:
        return None
    return _with(c, it, it.attr("start", 0), it.attr("step", 1), new[old.index(axis)])


def _offset(c: Ctx, x: int, y: int) -> int | None:
    """iota + k, k + iota, iota - k for an integer splat k, when nothing broadcasts."""
    if c.n.dtype not in INTEGER:
        return None
    for it, k, sign in ((x, y, 1), (y, x, 1)) if c.n.op == "add" else ((x, y, -1),):
        node = _iota(c, it)
        if node is not None and c.same_type(it) and c.is_const(k):
            return _with(c, node, node.attr("start", 0) + sign * int(c.node(k).attr("value")), node.attr("step", 1))
    return None


def _difference(c: Ctx, x: int, y: int) -> int | None:
    """iota(a, s) - iota(b, s) on one axis is the splat a - b."""
    a, b = _iota(c, x), _iota(c, y)
    if (a is None or b is None or c.n.dtype not in INTEGER or not (c.same_type(x) and c.same_type(y))
            or a.attr("axis") % a.type.rank != b.attr("axis") % b.type.rank or a.attr("step", 1) != b.attr("step", 1)):
        return None
    gap = a.attr("start", 0) - b.attr("start", 0)
    return c.const(gap, c.n.dtype, c.n.shape) if isinstance(gap, int) else None


def _concat(c: Ctx, *xs: int) -> int | None:
    """concat of iotas along their axis, each starting where the one before stopped, is one iota."""
    parts = [_iota(c, x) for x in xs]
    axis = c.n.attr("axis") % c.n.type.rank
    if any(p is None or p.attr("axis") % p.type.rank != axis or p.dtype != c.n.dtype for p in parts):
        return None
    step = parts[0].attr("step", 1)
    for before, after in zip(parts, parts[1:]):
        if after.attr("step", 1) != step or after.attr("start", 0) != before.attr("start", 0) + before.shape[axis] * step:
            return None
    return _with(c, parts[0], parts[0].attr("start", 0), step)


def _torch_op_of_a_splat(c: Ctx, *args: int) -> int | None:
    """cumsum of zeros is zeros; any advanced index into a splat is that splat."""
    target = c.n.attr("target")
    if not args or not c.is_const(args[0]) or c.n.attr("output") not in (None, 0):
        return None
    value = c.node(args[0]).attr("value")
    if target == "aten.cumsum.default" and value == 0:
        return c.const(0 if c.n.dtype in INTEGER else (False if c.n.dtype == "bool" else 0.0), c.n.dtype, c.n.shape)
    if target == "aten.index.Tensor" and c.n.dtype == c.type(args[0]).dtype:
        return c.const(value, c.n.dtype, c.n.shape)
    return None


RANGE_RULES: tuple[Rule, ...] = (
    ("slice", _slice),
    ("reshape", _reshape),
    (("add", "sub"), _offset),
    ("sub", _difference),
    ("concat", _concat),
    ("extern", _torch_op_of_a_splat),
)


def simplify_ranges(graph: Graph) -> Graph:
    """Apply `RANGE_RULES`. Expects a verified graph; guarantees no slice, unit reshape, integer offset or
    aligned concat of an iota remains, and no cumsum of zeros or advanced index into a splat."""
    return rewrite(graph, RANGE_RULES)
