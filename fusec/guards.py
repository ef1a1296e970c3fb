"""Guards: what a compiled program checks before its generated code runs.

A program is compiled for one *signature* (its dynamic dimensions symbolic, see `fusec.symbolic`): the
structure of the call's arguments, and per tensor its shape, dtype, device and layout (per non-tensor
leaf, its value).
`fusec.api.CompiledModule` keeps one program per signature it has seen:

- a call with a known signature runs that program;
- a call differing only in dimensions marked dynamic runs the one symbolic program (`fusec.sizes`) when
  its sizes are in the program's range; outside a declared range it is a SizeError, outside the range
  torch.export found it compiles a program for that shape, silently and without limit;
- any other difference is a `TypeError`/`ValueError` naming what was expected and what was given, or,
  with `recompile=True`, a new program (at most `cache_limit` of them; past it, a warning, and new
  signatures run in PyTorch eager);
- inputs on another device, or not strided, are always an error; non-contiguous inputs are fine (the
  runtimes copy them to contiguous arrays first).

Inside a program, index tensors fed to a gather (`take`, from `embedding`/`index_select`/`index`) are
range-checked before the kernel reads through them, so a bad token id is an IndexError, never an
out-of-bounds read. Indices computed inside the fused kernel (`ids + 5`) are checked by the generated
code where they are computed: an index out of range reads row 0 instead and is reported, and the
program raises the same IndexError after the kernel (`backends.numba_cpu.runtime`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from fusec.dtypes import from_torch, to_torch
from fusec.errors import TakeIndexError
from fusec.ir import Graph, Node

VIEWS = ("reshape", "permute", "expand")  # views that keep every index value (a slice drops some)

# --- signatures ----------------------------------------------------------------------------------------


def leaf_key(x: Any) -> tuple:
    """The part of a signature one flattened argument contributes."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device.type, x.layout)
    try:
        hash(x)
        return ("value", type(x).__name__, x)
    except TypeError:
        return ("value", type(x).__name__, repr(x))


def same_constant(given: Any, traced: Any) -> bool:
    """Whether a non-tensor argument equals the constant a program was traced with: same type and value
    (True, 1 and 1.0 compare equal but trace differently: `x[True]` adds a dimension, `x.long() * 2.0` is
    float); NaN matches NaN."""
    if type(given) is not type(traced):
        return False
    try:
        return bool(given == traced) or (given != given and traced != traced)
    except Exception:  # a value whose == is not a truth value
        return given is traced


def signature_key(leaves: list, spec: Any) -> tuple:
    return (spec, tuple(leaf_key(x) for x in leaves))


def kwarg_order(in_spec: Any) -> tuple:
    """The keyword arguments' names in the order of the traced call (the pytree spec of (args, kwargs)):
    calls with the same keywords in another order are put in this one (order does not matter in Python)."""
    try:
        kwargs = in_spec.child(1)
        return tuple(kwargs.context) if kwargs.type is dict else ()
    except (AttributeError, IndexError, TypeError):
        return ()


def mismatch(traced: Any, types: list, dynamic: "Dynamic", signature: str, args: tuple, kwargs: dict,
             leaves: list, spec: Any) -> tuple[Exception | None, bool]:
    """How a call differs from a program's signature (`traced` and its input `types`): (error, fatal). A
    fatal error is raised even with recompile=True (a non-tensor, another device); dimensions `dynamic`
    allows are no error."""
    name, expected = traced.module_name, traced.input_leaves
    if spec != traced.in_spec:
        n_tensors = sum(1 for x in expected if isinstance(x, str) and x == "tensor")
        return TypeError(f"compiled {name} expects {n_tensors} input tensor(s) like the example inputs "
                         f"({signature}); got {len(args)} positional and {len(kwargs)} keyword argument(s): "
                         f"{_describe(args, kwargs)}"), False
    index = 0
    for leaf, want in zip(leaves, expected):
        if isinstance(want, str) and want == "tensor":
            found = _check_tensor(index, traced.input_names[index], leaf, types[index], dynamic)
            if found[0] is not None:
                return found
            index += 1
        elif not same_constant(leaf, want):
            return ValueError(f"compiled {name} was traced with the constant {want!r} ({type(want).__name__}) "
                              f"for this argument; got {leaf!r} ({type(leaf).__name__}) (compile again for "
                              f"another value, or pass recompile=True)"), False
    return None, False


def _check_tensor(i: int, name: str, x: Any, want: Any, dynamic: "Dynamic") -> tuple[Exception | None, bool]:

    if not isinstance(x, torch.Tensor):
        return TypeError(f"input {i} ({name}) must be a torch.Tensor {want}, got {type(x).__name__}"), True
    if x.device.type != "cpu":
        return ValueError(f"input {i} ({name}) must be on the CPU, got {x.device}"), True
    if x.layout != torch.strided:
        return ValueError(f"input {i} ({name}) must be a dense (strided) tensor, got {x.layout}"), True
    if x.dtype != to_torch(want.dtype):
        return TypeError(f"input {i} ({name}) must have dtype {to_torch(want.dtype)}, got {x.dtype}"), False
    shape = tuple(x.shape)
    if len(shape) != want.rank or any(d != w and not dynamic.allows(i, ax, want.rank)
                                      for ax, (d, w) in enumerate(zip(shape, want.shape))):
        axes = sorted(a % want.rank for a in dynamic.dims.get(i, ()) if -want.rank <= a < want.rank)
        may = f" (dimensions {axes} may change)" if axes else ""
        return ValueError(f"input {i} ({name}) must have shape {list(want.shape)}{may}, got {list(shape)}"), False
    return None, False


def _describe(args: tuple, kwargs: dict) -> str:

    def one(x):
        return f"{x.dtype}{list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "nothing"


def describe_leaves(leaves: list) -> str:

    parts = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            try:
                parts.append(f"{from_torch(x.dtype)}[{','.join(str(d) for d in x.shape)}]")
            except Exception:
                parts.append(f"{x.dtype}{list(x.shape)}")
        else:
            parts.append(repr(x))
    return ", ".join(parts)


@dataclass(frozen=True)
class Dynamic:
    """Which dimensions of which tensor inputs (by position among the tensor inputs) may change."""

    dims: Mapping[int, frozenset[int]]
    every: bool = False  # every dimension of every tensor input

    def allows(self, tensor_index: int, axis: int, rank: int) -> bool:
        if self.every:
            return True
        return axis in self.dims.get(tensor_index, ()) or axis - rank in self.dims.get(tensor_index, ())


def check_dynamic_mapping(dynamic: Any) -> None:
    """`dynamic=` (past True) must map input names or positions to dimensions."""
    if not isinstance(dynamic, Mapping):
        raise TypeError(f"dynamic must be None, True or a mapping of input name to dimensions, got "
                        f"{type(dynamic).__name__}")


def input_position(key: Any, input_names: list[str]) -> int:
    """The position among the tensor inputs that `dynamic=`'s key `key` (a name or a position) names."""
    if isinstance(key, int) and 0 <= key < len(input_names):
        return key
    if key in input_names:
        return input_names.index(key)
    raise ValueError(f"dynamic names the input {key!r}, but the tensor inputs are "
                     f"{', '.join(map(repr, input_names)) or 'none'} (or their positions)")


def parse_dynamic(dynamic: Any, input_names: list[str]) -> Dynamic:
    """`dynamic` as given to `fusec.compile`: None, True (every dimension), or a mapping from an input's
    name (as traced: the forward argument's name) or position among the tensor inputs to the dimensions
    that may change, e.g. `{"x": {1}}` or `{0: [1]}`."""
    if dynamic is None or dynamic is False:
        return Dynamic({})
    if dynamic is True:
        return Dynamic({}, every=True)
    check_dynamic_mapping(dynamic)
    dims: dict[int, frozenset[int]] = {}
    for key, axes in dynamic.items():
        index = input_position(key, input_names)
        axes = [axes] if isinstance(axes, int) else list(axes)
        if not all(isinstance(a, int) for a in axes):
            raise TypeError(f"dynamic[{key!r}] must be dimension numbers, got {axes!r}")
        dims[index] = frozenset(axes)
    return Dynamic(dims)


# --- gathers -------------------------------------------------------------------------------------------

def take_index_checks(kernel: Node) -> list[tuple[int, int, str]]:
    """(operand position, bound, what) for each operand of `kernel` that a `take` in its body uses as
    indices (directly or through views): its values must lie in [0, bound)."""
    body: Graph | None = kernel.attr("body")
    if body is None:
        return []
    checks = []
    for n in body.nodes:
        if n.op != "take":
            continue
        src = index_source(body, n)
        if src is not None:
            bound = take_bound(body, n)
            checks.append((src, bound, describe_take(body, n)))
    return sorted(set(checks))


def index_source(body: Graph, take: Node) -> int | None:
    """The kernel operand position whose values `take` uses as indices (directly or through views), or
    None when the indices are computed inside the kernel: the generated code checks those itself."""
    idx = take.args[1]
    while body.nodes[idx].op in VIEWS:
        idx = body.nodes[idx].args[0]
    src = body.nodes[idx]
    return src.attr("index") if src.op == "input" else None


def take_bound(body: Graph, take: Node) -> int:
    """The size of the axis `take` gathers along: its indices must lie in [0, bound)."""
    return body.nodes[take.args[0]].shape[take.attr("axis") % body.nodes[take.args[0]].type.rank]


def describe_take(body: Graph, take: Node) -> str:
    where = f" from {take.origin}" if take.origin else ""
    return f"gather along an axis of size {take_bound(body, take)}{where}"


def check_indices(x: np.ndarray, bound: int, what: str) -> None:
    """Raise IndexError (a TakeIndexError, as the backends do) if an index lies outside [0, bound)."""
    if x.size == 0:
        return
    lo, hi = x.min(), x.max()
    if lo < 0 or hi >= bound:
        bad = lo if lo < 0 else hi
        raise TakeIndexError(f"index {int(bad)} is out of range for a {what} (indices must be in [0, {bound}))")


def tensor_leaves(leaves: Iterable[Any]) -> list:
    return [x for x in leaves if isinstance(x, torch.Tensor)]
