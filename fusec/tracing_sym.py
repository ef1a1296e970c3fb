"""Tracing with symbolic sizes: `fusec.compile(..., dynamic=...)` exports with torch.export `Dim`s and
maps the sizes torch.export computes (sympy expressions in its own symbols) onto `fusec.symbolic.Sym`.

`dynamic` names tensor inputs (by forward argument name or position among the tensor inputs) and, per
input, the dimensions that vary:
- `{"x": {1: (lo, hi)}}` (or a `torch.export.Dim`): one program for every size in [lo, hi]; a call
  outside is a SizeError naming the dimension, the bounds and the value;
- `{"x": {1}}` or `{"x": [1]}`: the range torch.export finds the module supports (`Dim.AUTO`,
  capped at `DEFAULT_MAX`); a size outside it (torch specializes 1 this way) compiles its own program;
- `True`: every dimension of every tensor input, as the set form.
The IR names the variables s0, s1, ... in the order of the inputs' dimensions.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.utils._pytree as pytree

from fusec.errors import FusecError, UnsupportedOpError
from fusec.guards import check_dynamic_mapping, input_position
from fusec.symbolic import Sym

DEFAULT_MAX = 4096  # upper bound of a dynamic dimension given without bounds (before torch narrows it)


def tensor_names(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """A name per tensor leaf of (args, kwargs), in flattening order: the forward argument's name for a
    tensor argument, `name_k` for the k-th tensor inside a container argument."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        named = list(bound.arguments.items())
    except (TypeError, ValueError):
        named = [(f"arg{k}", a) for k, a in enumerate(args)] + list(kwargs.items())
    names = []
    for name, value in named:
        leaves = [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
        names += [name] if isinstance(value, torch.Tensor) else [f"{name}_{k}" for k in range(len(leaves))]
    return names


def dynamic_spec(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic: Any, dims: bool = True):
    """(ShapesCollection for torch.export, {(tensor position, axis): declared (lo, hi) or None}) of
    `dynamic`; (None, {}) when nothing is dynamic. ValueError/TypeError name a misfit. `dims=False`
    checks and gives only the bounds (the ShapesCollection is None): making torch.export's Dims imports
    sympy, which a program from the trace cache does without."""
    if dynamic is None or dynamic is False:
        return None, {}
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    names = tensor_names(module, args, kwargs)
    if dynamic is True:
        dynamic = {k: set(range(t.dim())) for k, t in enumerate(tensors)}
    check_dynamic_mapping(dynamic)
    spec, declared = None, {}
    if dims:
        from torch.export import ShapesCollection  # torch.export loads sympy: only when Dims are made
        spec = ShapesCollection()
    for key, axes in dynamic.items():
        pos = input_position(key, names)
        items = axes.items() if hasattr(axes, "items") else [(a, None) for a in ([axes] if isinstance(axes, int) else axes)]
        made = {}
        for axis, bounds in items:
            if not isinstance(axis, int) or not -tensors[pos].dim() <= axis < tensors[pos].dim():
                raise ValueError(f"dynamic[{key!r}]: {axis!r} is not a dimension of a tensor of shape "
                                 f"{list(tensors[pos].shape)}")
            axis %= tensors[pos].dim()
            declared[pos, axis] = _bounds(bounds, key, axis)
            if dims:
                made[axis] = _dim(f"{names[pos]}_{axis}", bounds)
        if dims:
            spec[tensors[pos]] = made
    return spec, declared


def _bounds(bounds: Any, key: Any, axis: int) -> tuple[int, int] | None:
    """The (lo, hi) declared for a dimension (None: the range torch.export finds); errors name a misfit."""
    if bounds is None:
        return None
    if isinstance(bounds, tuple) and len(bounds) == 2 and all(isinstance(b, int) for b in bounds):
        lo, hi = bounds
        if not 1 <= lo <= hi:
            raise ValueError(f"dynamic[{key!r}][{axis}]: bounds must satisfy 1 <= lo <= hi, got {bounds}")
        return lo, hi
    if type(bounds).__name__ in ("Dim", "_Dim") or hasattr(bounds, "max"):
        return bounds.min, bounds.max
    raise TypeError(f"dynamic[{key!r}][{axis}] must be (lo, hi) or a torch.export.Dim, got {bounds!r}")


def _dim(name: str, bounds: Any):
    """torch.export's Dim for checked `bounds`."""
    from torch.export import Dim
    if bounds is None:
        return Dim.AUTO(min=1, max=DEFAULT_MAX)  # (torch may find the size static: then it is)
    if isinstance(bounds, tuple):
        return Dim(name.replace(".", "_"), min=bounds[0], max=bounds[1])
    return bounds


class SizeMap:
    """torch.export's symbolic sizes -> `Sym`: its symbols become s0, s1, ... (in order of first use, the
    inputs first) with the bounds of `range_constraints`."""

    def __init__(self, program):
        self.ranges = {str(k): v for k, v in program.range_constraints.items()}
        self.vars: dict[str, Sym] = {}

    def __call__(self, d: Any) -> Any:
        """An int or a Sym for a dimension torch gives (an int, a SymInt, a sympy expression)."""
        if isinstance(d, int):
            return d
        expr = d.node.expr if isinstance(d, torch.SymInt) else d
        return self._convert(expr)

    def shape(self, shape) -> tuple:
        return tuple(self(d) for d in shape)

    def _convert(self, e):
        import sympy  # torch's symbolic sizes are sympy's: loaded (by torch) only when shapes are dynamic
        if isinstance(e, (int, sympy.Integer)) or getattr(e, "is_Integer", False):
            return int(e)
        if isinstance(e, sympy.Symbol):
            return self._var(str(e))
        if isinstance(e, sympy.Add):
            total = 0
            for a in e.args:
                total = total + self._convert(a)
            return total
        if isinstance(e, sympy.Mul):
            total = 1
            for a in e.args:
                total = total * self._convert(a)
            return total
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 0:
            base, total = self._convert(e.base), 1
            for _ in range(int(e.exp)):
                total = total * base
            return total
        raise UnsupportedOpError(f"the symbolic size {e}", "", "only sums and products of sizes are supported")

    def _var(self, name: str) -> Sym:
        if name not in self.vars:
            r = self.ranges.get(name)
            if r is None:
                raise FusecError(f"torch.export gave no range for the size {name}")
            lo, hi = int(r.lower), r.upper
            if not hi.is_integer:
                raise FusecError(f"the size {name} has no upper bound; give dynamic bounds, e.g. {{1: (1, 256)}}")
            self.vars[name] = Sym.var(f"s{len(self.vars)}", max(lo, 1), int(hi))
        return self.vars[name]
