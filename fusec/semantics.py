"""What every primitive op computes, on NumPy arrays: the definition the reference backend runs
(`backends/reference.py`), constant folding evaluates (`passes/canonicalize.py`) and the Numba backend is
tested against. It sits below the passes and the backends, next to the IR.

Each op is one entry of `_OPS` (op -> function(node, args, tensors)). `eval_node` runs one node and
conforms the result to the node's declared type; `evaluate_graph` runs the nodes of a static graph.

Semantics decisions, beyond "what NumPy does":
- Every result has exactly the node's declared shape and dtype; a shape that disagrees is a bug and
  raises FusecError, a dtype that disagrees (e.g. NumPy widening an i32 sum) is cast back.
- `bf16` values are float32 arrays rounded to bfloat16 precision after every node (like torch eager,
  which computes each bf16 op in float32 and rounds its result).
- f16 `sum` and `matmul` accumulate in float32, as torch does on CPU.
- A `matmul` with attribute quantize="int8" (its right operand an int8 weight, `passes.weights`)
  multiplies by its left operand quantized to int8 blocks of 32 along K (`quantize_activations`), as
  int8 x int8 kernels (llama.cpp's Q8_0) do.
- Integer `div` truncates toward zero (C semantics); integer division by zero gives 0.
- Float-only unary ops (exp, log, sqrt, rsqrt, sin, cos, tanh, sigmoid, erf, reciprocal) on integer
  operands compute in float64 and cast back to the integer dtype (truncating).
- `and`/`or` are logical on bool and float operands and bitwise on integers, so the result keeps the
  operand dtype as the type rule says (for bool, logical and bitwise agree).
- `take` raises `TakeIndexError` (a FusecError and an IndexError) for an index outside [0, n); negative
  indices do not wrap.
- Floating-point warnings (overflow, log(0), NaN casts) are silenced: results follow IEEE like torch.
- Results may be views of inputs, params or other results (`reshape`, `permute`, `slice`, read-only
  broadcast views from `expand` and `iota`); callers that need to own or write an output copy it.
- A multi-output `kernel` evaluates to a tuple of arrays, which `result` indexes; so does a `loop` (its
  carried values after the last iteration, then each per-iteration output stacked on a new axis 0).
- `extern` (an ATen op fusec has no lowering for) calls the op through PyTorch (`fusec.fallback`); it is
  the only op whose definition is not NumPy.
"""
from __future__ import annotations

from collections import ChainMap
from typing import Any, Callable, Mapping

import numpy as np

from fusec.dtypes import round_bf16, to_numpy
from fusec.errors import FusecError, TakeIndexError  # noqa: F401 - TakeIndexError re-exported
from fusec.fallback import call_extern
from fusec.ir import Graph, Node

Value = Any  # np.ndarray, or a tuple of them for a multi-output kernel
OpFn = Callable[[Node, list, Mapping[str, Any]], Value]


def as_numpy(x: Any) -> np.ndarray:
    """A NumPy view of a torch tensor or array-like (no copy, except bf16 tensors which become float32)."""
    if hasattr(x, "detach"):  # a torch.Tensor; checked by duck type so torch is never imported here
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


# --- sources ------------------------------------------------------------------------------------------

def _param(node: Node, args: list, tensors: Mapping[str, Any]) -> np.ndarray:
    return as_numpy(tensors[node.attr("name")])


def _const(node: Node, args: list, tensors: Mapping[str, Any]) -> np.ndarray:
    if node.attr("key") is not None:
        return as_numpy(tensors[node.attr("key")])
    return np.full(node.shape, node.attr("value"), dtype=to_numpy(node.dtype))


def _iota(node: Node, args: list, tensors: Mapping[str, Any]) -> np.ndarray:
    shape, dtype = node.shape, to_numpy(node.dtype)
    start, step = node.attr("start", 0), node.attr("step", 1)
    if not shape:
        return np.full((), start, dtype=dtype)
    axis = node.attr("axis") % len(shape)
    exact = all(isinstance(v, (int, bool)) for v in (start, step))  # integer arithmetic when possible
    line = (np.arange(shape[axis], dtype=np.int64 if exact else np.float64) * step + start).astype(dtype)
    along = [1] * len(shape)
    along[axis] = shape[axis]
    return np.broadcast_to(line.reshape(along), shape)


# --- elementwise --------------------------------------------------------------------------------------

def _is_int(x: np.ndarray) -> bool:
    return x.dtype.kind in "iu"


def _floaty(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A float-only unary function, applied to integer operands in float64 (cast back by `_conform`)."""
    return lambda x: fn(x.astype(np.float64) if x.dtype.kind in "iub" else x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a non-positive number never overflows, so both branches are finite.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _erf(x: np.ndarray) -> np.ndarray:
    # SciPy has no f16 loop; it would compute f16 in float64, so go through float32 as torch does.
    # (imported here: SciPy takes a warm start ~0.3 s to import, and most programs have no erf)
    import scipy.special
    return scipy.special.erf(x.astype(np.float32) if x.dtype == np.float16 else x)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not (_is_int(a) and _is_int(b)):
        return np.true_divide(a, b)
    q = np.floor_divide(a, b)  # floor; step back toward zero where the signs differ and it was inexact
    return q + ((q * b != a) & ((a < 0) != (b < 0)) & (b != 0))


def _logical_or_bitwise(logical: np.ufunc, bitwise: np.ufunc) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda a, b: bitwise(a, b) if _is_int(a) else logical(a, b)


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "neg": np.negative,
    "exp": _floaty(np.exp),
    "log": _floaty(np.log),
    "sqrt": _floaty(np.sqrt),
    "rsqrt": _floaty(lambda x: np.reciprocal(np.sqrt(x))),
    "sin": _floaty(np.sin),
    "cos": _floaty(np.cos),
    "tanh": _floaty(np.tanh),
    "sigmoid": _floaty(_sigmoid),
    "abs": np.abs,
    "reciprocal": _floaty(np.reciprocal),
    "erf": _floaty(_erf),
    "relu": lambda x: np.maximum(x, np.zeros((), x.dtype)),  # NaN stays NaN, as in torch
    "not": np.logical_not,
    "floor": lambda x: x if x.dtype.kind in "iub" else np.floor(x),
}

_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": _div,
    "pow": np.power,
    "max": np.maximum,  # NaN-propagating, like torch.maximum
    "min": np.minimum,
    "and": _logical_or_bitwise(np.logical_and, np.bitwise_and),
    "or": _logical_or_bitwise(np.logical_or, np.bitwise_or),
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
    "ge": np.greater_equal,
}


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> OpFn:
    return lambda node, args, tensors: fn(args[0])


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> OpFn:
    return lambda node, args, tensors: fn(args[0], args[1])


def _cast(node: Node, args: list, tensors: Mapping[str, Any]) -> np.ndarray:
    return args[0].astype(to_numpy(node.dtype))  # float -> int truncates toward zero, as in torch


# --- reductions and matmul ----------------------------------------------------------------------------

def _accumulator(x: np.ndarray) -> np.dtype:
    """The dtype sums accumulate in: float32 for f16, else the operand's own dtype (no widening)."""
    return np.dtype(np.float32) if x.dtype == np.float16 else x.dtype


def _reduce(fn: Callable[..., np.ndarray], accumulate: bool = False) -> OpFn:
    def run(node: Node, args: list, tensors: Mapping[str, Any]) -> np.ndarray:
        x = args[0]
        if x.ndim == 0:  # a rank-0 value reduces over nothing
            return x
        extra = {"dtype": _accumulator(x)} if accumulate else {}
        return fn(x, axis=tuple(node.attr("axes")), keepdims=bool(node.attr("keepdim")), **extra)
    return run


def _argmax(node: Node, args: list, tensors: Mapping[str, Any]) -> np.ndarray:
    axes, x = tuple(node.attr("axes")), args[0]
    if len(axes) != 1:
        raise FusecError(f"argmax: expects exactly one axis, got {list(axes)}")
    if x.ndim == 0:
        return np.zeros((), np.int64)
    return np.argmax(x, axis=axes[0], keepdims=bool(node.attr("keepdim")))  # first maximum; NaN wins


def quantize_activations(a: np.ndarray, block: int = 32) -> np.ndarray:
    """float32 activations a[..., K] as int8 blocks of `block` along K, widened back: per block,
    scale = max|a| / 127 and q = rint(a * (127 / max|a|)) (ties to even), the result q * scale (all in
    float32). An all-zero block stays zero, and so does a block so small (max|a| < 127 / float32's
    largest, ~3.7e-37) that 127 / max|a| overflows; a block holding inf or NaN becomes NaN."""
    blocks = a.reshape(*a.shape[:-1], a.shape[-1] // block, block).astype(np.float32, copy=False)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    finite = np.isfinite(blocks).all(axis=-1, keepdims=True)
    with np.errstate(all="ignore"):
        inverse = np.float32(127.0) / amax  # inf for a zero or too small block: that block quantizes to 0
        q = np.where(finite & np.isfinite(inverse), np.rint(blocks * inverse), np.float32(0.0))
    scale = np.where(finite, amax / np.float32(127.0), np.float32(np.nan))
    return (q * scale).astype(np.float32).reshape(a.shape)


def _matmul(node: Node, args: list, tensors: Mapping[str, Any]) -> np.ndarray:
    a, b = args
    if node.attr("quantize") == "int8":  # an int8 weight (`passes.weights`): int8 activations too
        a = quantize_activations(a)
    acc = _accumulator(a)
    return np.matmul(a.astype(acc, copy=False), b.astype(acc, copy=False))


# --- layout and gather --------------------------------------------------------------------------------

def _slice(node: Node, args: list, tensors: Mapping[str, Any]) -> np.ndarray:
    where = [slice(None)] * args[0].ndim
    where[node.attr("axis")] = slice(node.attr("start"), node.attr("stop"), node.attr("step"))
    return args[0][tuple(where)]


def _take(node: Node, args: list, tensors: Mapping[str, Any]) -> np.ndarray:
    x, idx = args
    axis = node.attr("axis") % x.ndim
    n = x.shape[axis]
    if idx.size:
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise TakeIndexError(f"take: index {bad.flat[0]} is out of range for axis {axis} of size {n}"
                                 f" (indices must be in [0, {n}))")
    return np.take(x, idx, axis=axis)


# --- kernels ------------------------------------------------------------------------------------------

def _kernel(node: Node, args: list, tensors: Mapping[str, Any]) -> Value:
    body: Graph = node.attr("body")
    outs = evaluate_graph(body, args, ChainMap(tensors, body.tensors))  # type: ignore[arg-type]  # outer first: bound weights
    return outs[0] if len(outs) == 1 else tuple(outs)


def _loop(node: Node, args: list, tensors: Mapping[str, Any]) -> tuple:
    """Iteration l binds the weights `weights[l]` under iteration 0's names and reads row l of each sliced
    operand; carried operands take the body's first outputs; the others are stacked per iteration."""
    body: Graph = node.attr("body")
    carried, sliced, rows = node.attr("carried"), set(node.attr("sliced")), node.attr("weights")
    outer = ChainMap(tensors, body.tensors)  # type: ignore[arg-type]
    state, stacked = list(args), []
    for t in range(node.attr("trips")):
        bound = {first: outer[name] for first, name in zip(rows[0], rows[t])}
        outs = evaluate_graph(body, [x[t] if k in sliced else state[k] for k, x in enumerate(state)],
                    ChainMap(bound, outer))
        for pos, k in enumerate(carried):
            state[k] = outs[pos]
        stacked.append(outs[len(carried):])
    per = [np.stack([s[j] for s in stacked]) for j in range(len(body.outputs) - len(carried))]
    return tuple([state[k] for k in carried] + per)


def _result(node: Node, args: list, tensors: Mapping[str, Any]) -> np.ndarray:
    outs, index = args[0], node.attr("index")
    if not isinstance(outs, tuple) or not 0 <= index < len(outs):
        count = len(outs) if isinstance(outs, tuple) else 1
        raise FusecError(f"result: index {index} does not name one of the {count} kernel or loop output(s)")
    return outs[index]


def _extern(node: Node, args: list, tensors: Mapping[str, Any]) -> np.ndarray:
    return call_extern(node, args)


def _unsupported_input(node: Node, args: list, tensors: Mapping[str, Any]) -> np.ndarray:
    raise FusecError("input: values of input nodes are supplied by the caller (run_graph), not computed")


_OPS: dict[str, OpFn] = {
    "input": _unsupported_input,
    "param": _param,
    "const": _const,
    "iota": _iota,
    **{op: _unary(fn) for op, fn in _UNARY.items()},
    **{op: _binary(fn) for op, fn in _BINARY.items()},
    "where": lambda node, args, tensors: np.where(args[0], args[1], args[2]),
    "cast": _cast,
    "sum": _reduce(np.sum, accumulate=True),
    "amax": _reduce(np.amax),
    "amin": _reduce(np.amin),
    "argmax": _argmax,
    "matmul": _matmul,
    "reshape": lambda node, args, tensors: np.reshape(args[0], node.attr("shape")),
    "permute": lambda node, args, tensors: np.transpose(args[0], node.attr("perm")),
    "expand": lambda node, args, tensors: np.broadcast_to(args[0], node.attr("shape")),
    "slice": _slice,
    "concat": lambda node, args, tensors: np.concatenate(args, axis=node.attr("axis")),
    "take": _take,
    "kernel": _kernel,
    "loop": _loop,
    "result": _result,
    "extern": _extern,
}


# --- evaluation ---------------------------------------------------------------------------------------

def _conform(node: Node, value: Any) -> np.ndarray:
    """`value` as an array of exactly the node's type: cast a differing dtype, reject a differing shape."""
    value = np.asarray(value)  # ufuncs on rank-0 arrays return NumPy scalars
    if value.shape != node.shape:
        raise FusecError(f"{node.op}: computed shape {list(value.shape)} but the node declares {node.type}")
    dtype = to_numpy(node.dtype)
    if value.dtype != dtype:
        value = value.astype(dtype)
    return round_bf16(value) if node.dtype == "bf16" else value


def eval_node(node: Node, args: list[np.ndarray], tensors: Mapping[str, Any]) -> np.ndarray:
    """The value of one node from its operands' values (`input` nodes are supplied by the caller).

    The result has exactly the node's declared shape and dtype; a multi-output kernel gives a tuple.
    """
    fn = _OPS.get(node.op)
    if fn is None:
        raise FusecError(f"the reference backend has no definition for op {node.op!r}")
    with np.errstate(all="ignore"):
        value = fn(node, args, tensors)
        if node.op in ("kernel", "loop") and isinstance(value, tuple):
            return value
        return _conform(node, value)


def _last_uses(graph: Graph) -> list[list[int]]:
    """frees[i] = ids whose value is dead once node i ran (never an output)."""
    last = {a: i for i, n in enumerate(graph.nodes) for a in n.args}
    frees: list[list[int]] = [[] for _ in graph.nodes]
    outputs = set(graph.outputs)
    for i in range(len(graph.nodes)):
        if i not in outputs:
            frees[last.get(i, i)].append(i)
    return frees


def evaluate_graph(graph: Graph, inputs: list, tensors: Mapping[str, Any]) -> list[np.ndarray]:
    """The outputs of a static graph on `inputs` (in the order of `graph.inputs`, checked against their
    types), with `tensors` holding the arrays its params and consts name; a value is dropped after its
    last use."""
    input_ids = graph.inputs
    if len(inputs) != len(input_ids):
        raise FusecError(f"graph takes {len(input_ids)} input(s), got {len(inputs)}")
    values: dict[int, Any] = {}
    for pos, (i, x) in enumerate(zip(input_ids, inputs)):
        x, t = as_numpy(x), graph.nodes[i].type
        if x.shape != t.shape or x.dtype != to_numpy(t.dtype):
            raise FusecError(f"input {pos}: expected {t}, got {x.dtype}{list(x.shape)}")
        values[i] = x
    frees = _last_uses(graph)
    for i, node in enumerate(graph.nodes):
        if node.op != "input":
            try:
                values[i] = eval_node(node, [values[a] for a in node.args], tensors)
            except Exception as e:
                e.add_note(f"while evaluating %{i} = {node.op} : {node.type}"
                           + (f" from {node.origin}" if node.origin else ""))
                raise
        for dead in frees[i]:
            values.pop(dead, None)
    return [values[o] for o in graph.outputs]
