"""Index arithmetic of the generated code: index expressions (strings) of views of a body node.

`reshape_index` maps an index of a reshape to one of its operand; `_broadcast` an index of a node to one
of an operand broadcast against it; `_insert_axes` an index of a keepdim=False reduction to one of its
operand. `iadd`/`imul` fold constants so that simple views stay simple expressions.
"""
from __future__ import annotations

from fusec.errors import IRError
from fusec.symbolic import is_static


def iadd(a: str, b: str) -> str:
    if a == "0":
        return b
    if b == "0":
        return a
    if a.isdigit() and b.isdigit():
        return str(int(a) + int(b))
    return f"{a} + {b}"


def imul(a: str, k: int) -> str:
    if k == 1 or a == "0":
        return a
    if a.isdigit():
        return str(int(a) * k)
    return f"({a}) * {k}"


def reshape_index(idx: tuple[str, ...], out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> list[str]:
    """Index into `in_shape` of the element at `idx` of its reshape to `out_shape` (row-major).

    Axes are matched in groups of equal size products, so a reshape that only splits or merges axes
    costs one multiply-add or one div/mod per axis, and an axis that passes through stays untouched."""
    outs = [(d, i) for d, i in zip(out_shape, idx) if d != 1]
    ins = [d for d in in_shape if d != 1]
    result: list[str] = []
    o = j = 0
    while j < len(ins):
        group_out, prod_out = [], 1
        group_in, prod_in = [ins[j]], ins[j]
        j += 1
        while prod_out != prod_in:
            if _smaller(prod_out, prod_in):
                group_out.append(outs[o])
                prod_out *= outs[o][0]
                o += 1
            else:
                group_in.append(ins[j])
                prod_in *= ins[j]
                j += 1
        flat = group_out[0][1]
        for d, i in group_out[1:]:
            flat = f"({flat}) * {d} + {i}"
        stride = prod_in
        for n, size in enumerate(group_in):
            stride //= size
            e = f"({flat}) // {stride}" if stride != 1 else f"({flat})"
            result.append(e if n == 0 else f"{e} % {size}")
    return _expand_ones(result, in_shape)


def _smaller(a, b) -> bool:
    """a < b for the partial products of `reshape_index`'s groups. With a symbolic size the order must
    hold for every size: it does when one product divides the other (a split or merge of symbolic axes);
    any other mix of a symbolic axis with unrelated ones is an error rather than a guess."""
    if is_static((a, b)):
        return a < b
    for divisor, multiple, answer in ((a, b, True), (b, a, False)):
        try:
            multiple // divisor
            return answer
        except IRError:
            pass
    raise IRError(f"numba codegen: cannot match reshape groups of sizes {a} and {b}")


def _expand_ones(non_one: list[str], in_shape: tuple[int, ...]) -> list[str]:
    it = iter(non_one)
    return [("0" if d == 1 else next(it)) for d in in_shape]


def _broadcast(idx: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, ...]:
    sub = idx[len(idx) - len(shape):] if shape else ()
    return tuple("0" if d == 1 else i for d, i in zip(shape, sub))


def _insert_axes(idx: tuple[str, ...], axes) -> list[str]:
    """The source index of a keepdim=False reduction: put a 0 back at each reduced axis."""
    out = list(idx)
    for ax in sorted(axes):
        out.insert(ax, "0")
    return out
