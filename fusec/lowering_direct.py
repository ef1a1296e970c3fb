"""Lowering the program torch.export gives without `run_decompositions`: that call retraces the whole
program to reach core ATen and costs about as much as the export itself (twice as much with symbolic
sizes), for a handful of composite ops in a Llama-like module.

The lowerings here build, for those ops, exactly the IR their core-ATen decompositions lower to (the
same views, products and casts in the same order), so the passes and the generated code are the same
either way (`tests/test_trace_direct.py` compares the two). `direct_ok` says whether every op of an
exported program lowers directly: ops the decompositions leave alone, the ones here, and a few whose
decomposition the existing lowerings already match. Anything else (a mutation, a composite op not
handled here) sends the program through `run_decompositions` as before; so does `NotDirect`, raised by
a lowering here for a form of its op it does not reproduce.
"""
from __future__ import annotations

import operator
from typing import Any

import torch

from fusec.errors import FusecError
from fusec.lowering import IGNORED, LOWERINGS, _binary, lowers, packet_name
from fusec.lowering_tensor import _softmax


class NotDirect(FusecError):
    """This program does not lower without `run_decompositions` (the caller decomposes it)."""


# composite ops whose decomposition the existing lowerings already give (a permute, a view, a cast, a
# copy, a constant folded at trace time, a size; `where` with a Python number for a tensor: the number as
# a constant of the result's dtype)
SAME = {"aten.to", "aten.reshape", "aten.contiguous", "aten.clone", "aten.transpose", "aten.t",
        "aten.sym_size", "aten.arange", "aten.full", "aten.zeros", "aten.ones", "aten.detach", "aten.alias",
        "aten.silu", "aten.where"}
# lowered here as their decompositions are
HERE = {"aten.linear", "aten.matmul", "aten.type_as", "aten.masked_fill", "aten.softmax",
        "aten.repeat_interleave", "aten.stack", "aten.__or__", "aten.__and__"}
_DECOMPOSED: Any = None


def direct_ok(program) -> str | None:
    """None when every op of the exported `program` lowers without decompositions, else the first op
    that does not (for the debug log)."""
    global _DECOMPOSED
    if _DECOMPOSED is None:
        _DECOMPOSED = torch.export.default_decompositions()
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        target = node.target
        if getattr(target, "__module__", None) == "_operator" and isinstance(node.meta.get("val"), torch.SymInt):
            continue  # size arithmetic (T * dim): a symbolic size either way
        if not isinstance(target, torch._ops.OpOverload):
            return str(target)
        name = packet_name(target)
        if name in HERE or name in SAME or name in IGNORED:
            continue
        if name == "aten.dropout" and len(node.args) > 2 and node.args[2] is False:
            continue  # not training: the identity, as its decomposition
        if (target._schema.is_mutable or name not in LOWERINGS or target in _DECOMPOSED
                or torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd")):
            return str(target)
    return None


def _prod(xs) -> Any:
    n = 1
    for x in xs:
        n = n * x
    return n


def _permute_last(cx, v, rank: int):
    """v with its last two axes swapped."""
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return cx.add("permute", [v], perm=tuple(perm))


def _expand(cx, v, shape: tuple):
    t = cx.type(v)
    v = cx.reshape(v, (1,) * (len(shape) - t.rank) + t.shape)
    return v if tuple(shape) == cx.type(v).shape else cx.add("expand", [v], shape=tuple(shape))


def _matmul_of(cx, a, b):
    """at::matmul's own decomposition: a folded to two dimensions against a matrix, else both operands
    broadcast to one batch shape, folded to three dimensions for a batched product, unfolded after."""
    ta, tb = cx.type(a), cx.type(b)
    if ta.rank < 2 or tb.rank < 2:
        raise NotDirect("matmul of a vector")
    if tb.rank == 2:
        if ta.rank == 2:
            return cx.add("matmul", [a, b])
        flat = cx.reshape(a, (_prod(ta.shape[:-1]), ta.shape[-1]))
        return cx.reshape(cx.add("matmul", [flat, b]), tuple(ta.shape[:-1]) + (tb.shape[-1],))
    batch_a, batch_b = ta.shape[:-2], tb.shape[:-2]
    if len(batch_a) != len(batch_b) or any(x != y for x, y in zip(batch_a, batch_b) if 1 not in (x, y)):
        raise NotDirect("matmul with broadcast batch dimensions of different ranks")
    batch = tuple(y if x == 1 else x for x, y in zip(batch_a, batch_b))
    n, k, m = ta.shape[-2], ta.shape[-1], tb.shape[-1]
    left = cx.reshape(_expand(cx, a, batch + (n, k)), (_prod(batch), n, k))
    right = cx.reshape(_expand(cx, b, batch + (k, m)), (_prod(batch), k, m))
    return cx.reshape(cx.add("matmul", [left, right]), batch + (n, m))


@lowers("aten.linear")
def _linear(cx, x, weight, bias=None):
    """x @ weight^T (+ bias), as at::linear decomposes: with a bias, a matrix or a contiguous 3-d x is
    folded to a matrix first and the bias added to the product (addmm); else x times the transposed
    weight as at::matmul folds it, the bias added after."""
    dt = cx.out_dtype()
    x, w = cx.tensor(x, dt), cx.tensor(weight, dt)
    if cx.type(w).rank != 2:
        raise NotDirect("linear with a weight that is not a matrix")
    shape = cx.type(x).shape
    if bias is not None and (len(shape) == 2 or (len(shape) == 3 and _contiguous(cx, 0))):
        flat = cx.reshape(x, (_prod(shape[:-1]), shape[-1]))
        wt = cx.add("permute", [w], perm=(1, 0))
        out = cx.add("add", [cx.add("matmul", [flat, wt]), cx.tensor(bias, dt)])
        return cx.reshape(out, tuple(shape[:-1]) + (cx.type(w).shape[0],))
    out = _matmul_of(cx, x, cx.add("permute", [w], perm=(1, 0)))
    return out if bias is None else cx.add("add", [out, cx.tensor(bias, dt)])


def _contiguous(cx, k: int) -> bool:
    """Whether the node's k-th argument was contiguous as traced."""
    val = getattr(cx.node.args[k], "meta", {}).get("val")
    return val is not None and val.is_contiguous()


@lowers("aten.matmul")
def _matmul(cx, a, b):
    dt = cx.out_dtype()
    return _matmul_of(cx, cx.tensor(a, dt), cx.tensor(b, dt))


LOWERINGS["aten.__or__"] = _binary("or")  # a | b, a & b: bitwise_or / bitwise_and once decomposed
LOWERINGS["aten.__and__"] = _binary("and")


@lowers("aten.type_as")
def _type_as(cx, x, other):
    return cx.tensor(x, cx.out_dtype())


@lowers("aten.masked_fill")
def _masked_fill(cx, x, mask, value):
    """where(mask, value, x)."""
    dt = cx.out_dtype()
    return cx.add("where", [cx.tensor(mask, "bool"), cx.tensor(value, dt), cx.tensor(x, dt)])


@lowers("aten.softmax")
def _softmax_int(cx, x, dim, dtype=None):
    return _softmax(cx, cx.tensor(x, cx.out_dtype()), dim)


@lowers("aten.repeat_interleave")
def _repeat_interleave(cx, x, repeats, dim=None, output_size=None):
    """Each slice along `dim` `repeats` times in a row: a new axis after `dim`, expanded, merged."""
    if not isinstance(repeats, int) or dim is None:
        raise NotDirect("repeat_interleave with a tensor of repeats or no dim")
    x = cx.tensor(x)
    shape = cx.type(x).shape
    dim %= len(shape)
    wide = cx.reshape(x, shape[:dim + 1] + (1,) + shape[dim + 1:])
    wide = _expand(cx, wide, shape[:dim + 1] + (repeats,) + shape[dim + 1:])
    return cx.reshape(wide, cx.out_shape())


@lowers("aten.stack")
def _stack(cx, xs, dim=0):
    """Along the first axis: the tensors concatenated, then viewed with the new axis."""
    if dim != 0:
        raise NotDirect("stack along an axis other than the first")
    dt = cx.out_dtype()
    parts = [cx.tensor(x, dt) for x in xs]
    joined = parts[0] if len(parts) == 1 else cx.add("concat", parts, axis=0)
    return cx.reshape(joined, cx.out_shape())
