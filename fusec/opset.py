"""The primitive op set: each op's kind and its type rule.

Kinds form the lattice fusion decides over (TVM's idea): source < elementwise < layout < reduce < matmul <
gather < kernel; `extern` (an ATen op run by PyTorch, see `fusec.fallback`) is opaque: never fused.
Composite ATen ops are lowered to these by tracing; the NumPy reference backend defines what each op
computes.
"""
from __future__ import annotations

from typing import Any, Callable

from fusec.errors import IRError
from fusec.ir_types import FLOAT_DTYPES, TensorType

UNARY = ("neg", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "abs", "reciprocal",
         "erf", "relu", "not", "floor")
ARITHMETIC = ("add", "sub", "mul", "div", "pow", "max", "min", "and", "or")
COMPARE = ("eq", "ne", "lt", "le", "gt", "ge")
REDUCE = ("sum", "amax", "amin", "argmax")
LAYOUT = ("reshape", "permute", "expand", "slice", "concat")
SOURCE = ("input", "param", "const", "iota")

OPS: dict[str, str] = {
    **{op: "source" for op in SOURCE},
    **{op: "elementwise" for op in UNARY + ARITHMETIC + COMPARE + ("where", "cast")},
    **{op: "layout" for op in LAYOUT},
    **{op: "reduce" for op in REDUCE},
    "matmul": "matmul",
    "take": "gather",
    "kernel": "kernel",   # a fused kernel holding its subgraph (built by the fusion pass)
    "result": "kernel",   # output `index` of a multi-output kernel or of a loop
    "loop": "kernel",     # a body run `trips` times, values carried between iterations (passes.loop)
    "extern": "extern",   # an ATen op fusec cannot lower, run by PyTorch (fusec.fallback); never fused
}


def kind(op: str) -> str:
    return OPS[op]


def broadcast_shapes(*shapes: tuple[int, ...], op: str = "") -> tuple[int, ...]:
    """NumPy broadcasting of shapes; IRError if they do not broadcast."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0} - {1}
        if len(dims) > 1:
            raise IRError(f"{op}: shapes {' and '.join(str(list(s)) for s in shapes)} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _same_dtype(op: str, types: list[TensorType]) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise IRError(f"{op}: operands must share one dtype, got {', '.join(str(t) for t in types)}")
    return dtypes.pop()


def _arity(op: str, types: list[TensorType], n: int) -> None:
    if len(types) != n:
        raise IRError(f"{op}: expects {n} operand(s), got {len(types)}")


def _norm_axis(op: str, axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise IRError(f"{op}: axis {axis} is out of range for rank {rank}")
    return axis % max(rank, 1)


# --- type rules: one function per op family, looked up in RULES ----------------------------------------
# A rule takes (op, operand types, attributes, declared type) and returns the node's type, or raises
# IRError naming what does not fit. `declared` is the type a builder gave; only ops whose type cannot be
# derived (sources, kernels, externs) read it.

def _declared(op: str, types: list[TensorType], attrs: dict[str, Any], declared: TensorType | None) -> TensorType:
    if declared is None:
        raise IRError(f"{op}: needs an explicit type")
    return declared


def _iota(op, types, attrs, declared) -> TensorType:
    shape, axis = tuple(attrs["shape"]), attrs["axis"]
    _norm_axis(op, axis, len(shape))
    return TensorType(shape, attrs["dtype"])


def _unary(op, types, attrs, declared) -> TensorType:
    _arity(op, types, 1)
    t = types[0]
    if op == "not" and t.dtype != "bool":
        raise IRError(f"not: operand must be bool, got {t}")
    return t


def _cast(op, types, attrs, declared) -> TensorType:
    _arity(op, types, 1)
    return TensorType(types[0].shape, attrs["dtype"])


def _binary(op, types, attrs, declared) -> TensorType:
    _arity(op, types, 2)
    dtype = _same_dtype(op, types)
    shape = broadcast_shapes(types[0].shape, types[1].shape, op=op)
    return TensorType(shape, "bool" if op in COMPARE else dtype)


def _where(op, types, attrs, declared) -> TensorType:
    _arity(op, types, 3)
    if types[0].dtype != "bool":
        raise IRError(f"where: condition must be bool, got {types[0]}")
    dtype = _same_dtype(op, types[1:])
    return TensorType(broadcast_shapes(*(t.shape for t in types), op=op), dtype)


def _reduce(op, types, attrs, declared) -> TensorType:
    _arity(op, types, 1)
    t = types[0]
    axes = tuple(sorted(_norm_axis(op, a, t.rank) for a in attrs["axes"]))
    if tuple(attrs["axes"]) != axes or len(set(axes)) != len(axes):
        raise IRError(f"{op}: axes must be sorted, distinct and non-negative, got {attrs['axes']}")
    if attrs.get("keepdim"):
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape))
    else:
        shape = tuple(d for i, d in enumerate(t.shape) if i not in axes)
    return TensorType(shape, "i64" if op == "argmax" else t.dtype)


def _matmul(op, types, attrs, declared) -> TensorType:
    _arity(op, types, 2)
    a, b = types
    dtype = _same_dtype(op, types)
    if a.rank < 2 or b.rank < 2 or a.shape[-1] != b.shape[-2]:
        raise IRError(f"matmul: expects [..., M, K] @ [..., K, N], got {a} @ {b}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2], op=op)
    return TensorType(batch + (a.shape[-2], b.shape[-1]), dtype)


def _reshape(op, types, attrs, declared) -> TensorType:
    _arity(op, types, 1)
    shape = tuple(attrs["shape"])
    if TensorType(shape, "f32").numel != types[0].numel or any(d < 0 for d in shape):
        raise IRError(f"reshape: cannot reshape {types[0]} to {list(shape)}")
    return TensorType(shape, types[0].dtype)


def _permute(op, types, attrs, declared) -> TensorType:
    _arity(op, types, 1)
    perm, t = tuple(attrs["perm"]), types[0]
    if sorted(perm) != list(range(t.rank)):
        raise IRError(f"permute: {list(perm)} is not a permutation of the {t.rank} axes of {t}")
    return TensorType(tuple(t.shape[p] for p in perm), t.dtype)


def _expand(op, types, attrs, declared) -> TensorType:
    _arity(op, types, 1)
    shape, t = tuple(attrs["shape"]), types[0]
    if len(shape) != t.rank or any(s != d and s != 1 for s, d in zip(t.shape, shape)):
        raise IRError(f"expand: cannot expand {t} to {list(shape)} (same rank, only size-1 axes grow)")
    return TensorType(shape, t.dtype)


def _slice(op, types, attrs, declared) -> TensorType:
    _arity(op, types, 1)
    t = types[0]
    axis = _norm_axis(op, attrs["axis"], t.rank)
    start, stop, step = attrs["start"], attrs["stop"], attrs["step"]
    if axis != attrs["axis"] or not (0 <= start <= stop <= t.shape[axis]) or step < 1:
        raise IRError(f"slice: [{start}:{stop}:{step}] on axis {attrs['axis']} does not fit {t}")
    n = (stop - start + step - 1) // step
    return TensorType(t.shape[:axis] + (n,) + t.shape[axis + 1:], t.dtype)


def _concat(op, types, attrs, declared) -> TensorType:
    if not types:
        raise IRError("concat: needs at least one operand")
    axis = _norm_axis(op, attrs["axis"], types[0].rank)
    dtype = _same_dtype(op, types)
    for t in types:
        if t.rank != types[0].rank or any(d != e for i, (d, e) in enumerate(zip(t.shape, types[0].shape)) if i != axis):
            raise IRError(f"concat: shapes {', '.join(str(t) for t in types)} differ off axis {axis}")
    total = sum(t.shape[axis] for t in types)
    return TensorType(types[0].shape[:axis] + (total,) + types[0].shape[axis + 1:], dtype)


def _take(op, types, attrs, declared) -> TensorType:
    _arity(op, types, 2)
    x, idx = types
    axis = _norm_axis(op, attrs["axis"], x.rank)
    if idx.dtype not in ("i64", "i32"):
        raise IRError(f"take: indices must be integers, got {idx}")
    return TensorType(x.shape[:axis] + idx.shape + x.shape[axis + 1:], x.dtype)


Rule = Callable[[str, list[TensorType], dict[str, Any], TensorType | None], TensorType]

# every op of OPS has exactly one rule (tests/test_opset.py checks it)
RULES: dict[str, Rule] = {
    **{op: _declared for op in ("input", "param", "const")},
    "iota": _iota,
    **{op: _unary for op in UNARY},
    "cast": _cast,
    **{op: _binary for op in ARITHMETIC + COMPARE},
    "where": _where,
    **{op: _reduce for op in REDUCE},
    "matmul": _matmul,
    "reshape": _reshape,
    "permute": _permute,
    "expand": _expand,
    "slice": _slice,
    "concat": _concat,
    "take": _take,
    **{op: _declared for op in ("kernel", "result", "loop", "extern")},  # typed by the pass or tracer building them
}


def infer(op: str, types: list[TensorType], attrs: dict[str, Any], declared: TensorType | None = None) -> TensorType:
    """The type `op` produces from operand types and attributes (IRError when they do not fit)."""
    rule = RULES.get(op)
    if rule is None:
        raise IRError(f"unknown op {op!r}")
    return rule(op, types, attrs, declared)


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES
