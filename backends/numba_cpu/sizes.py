"""Symbolic sizes in generated code: each kernel reads the values of its size variables from the shapes
of the arrays it is given, so one compiled function serves every size in the bounds (`fusec.symbolic`).
"""
from __future__ import annotations

from fusec.errors import FusecError
from fusec.ir import Graph
from fusec.symbolic import Sym


def size_lines(body: Graph, inputs: list[str], outputs: list[str]) -> list[tuple[str, str]]:
    """(variable, `var = ...` line) for every size variable of kernel `body`, read from an axis of an
    operand (`inputs`, in `body.inputs` order) or of an output whose size is `c*var + k`."""
    arrays = [(name, body.nodes[i].shape) for name, i in zip(inputs, body.inputs)]
    arrays += [(name, body.nodes[o].shape) for name, o in zip(outputs, body.outputs)]
    lines = []
    for var in sorted(body.sizes):
        for name, shape in arrays:
            found = next((_solve(var, name, axis, d) for axis, d in enumerate(shape)
                          if _solve(var, name, axis, d)), None)
            if found:
                lines.append((var, found))
                break
        else:
            raise FusecError(f"numba backend: no operand or output of a kernel gives the size {var} "
                             f"(shapes {[str(s) for _, s in arrays]})")
    return lines


def _solve(var: str, name: str, axis: int, d) -> str | None:
    """`var = ...` when size `d` is c*var + k (c > 0), read from `name.shape[axis]`."""
    if not isinstance(d, Sym) or d.names != (var,):
        return None
    terms = dict(d.terms)
    if set(terms) - {(var,), ()} or terms.get((var,), 0) <= 0:
        return None
    c, k = terms[(var,)], terms.get((), 0)
    text = f"{name}.shape[{axis}]" + (f" - {k}" if k > 0 else f" + {-k}" if k < 0 else "")
    return f"{var} = ({text}) // {c}" if c != 1 else f"{var} = {text}"
