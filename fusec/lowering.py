"""ATen -> fusec IR: one lowering per core-ATen op, in a table keyed by the op's packet name.

A lowering receives the op's arguments with every tensor already turned into a `TV` (an IR value) or a
constant torch tensor, and returns a `TV` (or a tuple of them). Composite ops (softmax, layer norm, gelu,
mean, addmm, ...) decompose into primitives here; the fusion pass rebuilds them as fused kernels later.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fusec.dtypes import from_torch, to_torch
from fusec.errors import UnsupportedOpError
from fusec.ir import Builder, TensorType


@dataclass(frozen=True)
class TV:
    """A tensor value of the graph being built: the id of its IR node."""

    id: int


class Lowerer:
    """What a lowering sees: the builder, the expected output (`out`, from tracing) and small helpers."""

    def __init__(self, builder: Builder):
        self.b = builder
        self.out: Any = None  # FakeTensor (or tuple) torch.export recorded for the node being lowered
        self.origin = ""
        self.current = ""  # packet name of the op being lowered, e.g. "aten.mm"
        self.strict = False  # True: an op without a lowering raises instead of falling back to torch
        self.size: Callable[[Any], Any] = int  # a dimension torch gives -> an int or a fusec.symbolic.Sym

    # -- values ---------------------------------------------------------------------------------------
    def type(self, v: TV) -> TensorType:
        return self.b.type(v.id)

    def add(self, op: str, args=(), **attrs) -> TV:
        return TV(self.b.add(op, [a.id for a in args], attrs, origin=self.origin))

    def tensor(self, x: Any, dtype: str | None = None) -> TV:
        """An IR value for `x`: a TV as is (cast to `dtype` if given), a constant tensor or a Python scalar."""
        if isinstance(x, TV):
            return self.cast(x, dtype) if dtype else x
        if isinstance(x, torch.Tensor):
            t = x.detach()
            dt = dtype or from_torch(t.dtype)
            flat = t.reshape(-1)
            if flat.numel() > 0 and bool((flat == flat[0]).all()) and t.dtype != torch.bfloat16:
                return TV(self.b.const(flat[0].item(), dt, tuple(t.shape)))
            return TV(self.b.const_array(t.to(torch.float32 if dt == "bf16" else t.dtype).numpy(), dt))
        if isinstance(x, (bool, int, float)):
            dt = dtype or ("bool" if isinstance(x, bool) else "i64" if isinstance(x, int) else "f32")
            return TV(self.b.const(_scalar_for(x, dt), dt))
        raise UnsupportedOpError(type(x).__name__, self.origin, "expected a tensor or a number")

    def cast(self, v: TV, dtype: str) -> TV:
        return v if self.type(v).dtype == dtype else self.add("cast", [v], dtype=dtype)

    def out_shape(self) -> tuple:
        """The shape torch.export recorded for the node's (first) output, symbolic sizes as `Sym`s."""
        val = self.out[0] if isinstance(self.out, (tuple, list)) else self.out
        return tuple(self.size(d) for d in val.shape)

    def out_dtype(self, index: int = 0) -> str:
        val = self.out[index] if isinstance(self.out, (tuple, list)) else self.out
        return from_torch(val.dtype)

    def compute_dtype(self, *xs: Any) -> str:
        """The dtype torch promotes these operands to (tensors keep their rank-0-or-not status)."""
        dummies = [torch.empty(() if self.type(x).rank == 0 else (0,), dtype=to_torch(self.type(x).dtype))
                   if isinstance(x, TV) else x for x in xs]
        if len(dummies) == 1:
            return from_torch(dummies[0].dtype) if isinstance(dummies[0], torch.Tensor) else "f32"
        dt = torch.result_type(dummies[0], dummies[1])
        for d in dummies[2:]:
            dt = torch.promote_types(dt, torch.result_type(torch.empty((0,), dtype=dt), d))
        return from_torch(dt)

    # -- shapes ---------------------------------------------------------------------------------------
    def reshape(self, v: TV, shape) -> TV:
        shape = _resolve_shape(list(shape), self.type(v).numel)
        return v if tuple(shape) == self.type(v).shape else self.add("reshape", [v], shape=shape)

    def reduce(self, op: str, v: TV, dims, keepdim: bool) -> TV:
        rank = self.type(v).rank
        axes = sorted({d % rank for d in dims} if dims else range(rank)) if rank else []
        return self.add(op, [v], axes=tuple(axes), keepdim=bool(keepdim)) if axes or op != "argmax" else v


def _scalar_for(x, dtype: str):
    if dtype == "bool":
        return bool(x)
    return float(x) if dtype in ("f32", "f64", "f16", "bf16") else int(x)


def _resolve_shape(shape: list[int], numel: int) -> list[int]:
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = numel // known if known else 0
    return shape


# fx nodes that only check metadata at run time; they produce nothing the graph needs
IGNORED = {"aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_constrain_range_for_size",
           "aten._assert_async", "aten.sym_constrain_range"}


def packet_name(target) -> str:
    """'aten.mm' for torch.ops.aten.mm.default: the key of an op in LOWERINGS."""
    name = getattr(target, "name", None)
    text = name() if callable(name) else str(target)
    text = text.replace("::", ".")
    return ".".join(text.split(".")[:2])


Lowering = Callable[..., Any]
LOWERINGS: dict[str, Lowering] = {}


def lowers(*names: str):
    def register(fn: Lowering) -> Lowering:
        for n in names:
            LOWERINGS[n] = fn
        return fn
    return register


# -- elementwise --------------------------------------------------------------------------------------
UNARY_ATEN = {"neg": "neg", "exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "sin": "sin",
              "cos": "cos", "tanh": "tanh", "sigmoid": "sigmoid", "abs": "abs", "reciprocal": "reciprocal",
              "erf": "erf", "relu": "relu", "logical_not": "not", "bitwise_not": "not", "floor": "floor"}
BINARY_ATEN = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "pow": "pow", "maximum": "max",
               "minimum": "min", "bitwise_and": "and", "logical_and": "and", "bitwise_or": "or",
               "logical_or": "or"}
COMPARE_ATEN = {"eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge"}

for _aten, _op in UNARY_ATEN.items():
    LOWERINGS[f"aten.{_aten}"] = (lambda op: lambda cx, x: cx.add(op, [cx.tensor(x, cx.out_dtype())]))(_op)


def _binary(op: str):
    def lower(cx: Lowerer, a, b, alpha=None, rounding_mode=None):
        if rounding_mode is not None:
            raise UnsupportedOpError(f"div(rounding_mode={rounding_mode!r})", cx.origin)
        dt = cx.out_dtype()
        if op in ("and", "or") and dt != "bool":
            raise UnsupportedOpError(f"bitwise {op} on {dt}", cx.origin, "only bool operands are supported")
        ta, tb = cx.tensor(a, dt), cx.tensor(b, dt)
        if alpha is not None and alpha != 1:
            tb = cx.add("mul", [tb, cx.tensor(alpha, dt)])
        return cx.add(op, [ta, tb])
    return lower


for _aten, _op in BINARY_ATEN.items():
    LOWERINGS[f"aten.{_aten}"] = _binary(_op)


def _compare(op: str):
    def lower(cx: Lowerer, a, b):
        dt = cx.compute_dtype(a, b)
        return cx.add(op, [cx.tensor(a, dt), cx.tensor(b, dt)])
    return lower


for _aten, _op in COMPARE_ATEN.items():
    LOWERINGS[f"aten.{_aten}"] = _compare(_op)


@lowers("aten.rsub")
def _rsub(cx, a, b, alpha=1):
    return _binary("sub")(cx, b, a if alpha == 1 else cx.add("mul", [cx.tensor(a, cx.out_dtype()),
                                                                    cx.tensor(alpha, cx.out_dtype())]))


@lowers("aten.where")
def _where(cx, cond, a, b):
    dt = cx.out_dtype()
    return cx.add("where", [cx.tensor(cond, "bool"), cx.tensor(a, dt), cx.tensor(b, dt)])


@lowers("aten.clamp", "aten.clamp_min", "aten.clamp_max")
def _clamp(cx, x, lo=None, hi=None):
    dt = cx.out_dtype()
    v = cx.tensor(x, dt)
    if lo is not None:
        v = cx.add("max", [v, cx.tensor(lo, dt)])
    if hi is not None:
        v = cx.add("min", [v, cx.tensor(hi, dt)])
    return v


@lowers("aten._to_copy", "aten.to", "aten.clone", "aten.alias", "aten.contiguous", "aten.detach",
        "aten.lift_fresh_copy", "aten.dropout")
def _identity(cx, x, *args, **kwargs):
    return cx.tensor(x, cx.out_dtype())


@lowers("aten.full_like", "aten.zeros_like", "aten.ones_like")
def _fill_like(cx, x, value=None, **kwargs):
    value = {"aten.zeros_like": 0, "aten.ones_like": 1}.get(cx.current, value)
    dt = cx.out_dtype()
    return TV(cx.b.const(_scalar_for(value, dt), dt, cx.out_shape()))


@lowers("aten.gelu")
def _gelu(cx, x, approximate="none"):
    dt = cx.out_dtype()
    x = cx.tensor(x, dt)
    c = lambda v: cx.tensor(v, dt)  # noqa: E731 - a constant of the output dtype
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        inner = cx.add("mul", [c(math.sqrt(2 / math.pi)),
                               cx.add("add", [x, cx.add("mul", [c(0.044715), cx.add("mul", [x, cx.add("mul", [x, x])])])])])
        return cx.add("mul", [cx.add("mul", [c(0.5), x]), cx.add("add", [c(1.0), cx.add("tanh", [inner])])])
    erf = cx.add("erf", [cx.add("mul", [x, c(1 / math.sqrt(2))])])  # 0.5 x (1 + erf(x / sqrt 2))
    return cx.add("mul", [cx.add("mul", [c(0.5), x]), cx.add("add", [c(1.0), erf])])


@lowers("aten.silu")
def _silu(cx, x):  # as its decomposition (fusec.lowering_direct lowers from torch.export's own program)
    x = cx.tensor(x, cx.out_dtype())
    return cx.add("mul", [x, cx.add("sigmoid", [x])])
