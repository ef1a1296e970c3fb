"""The matrix-vector products as generated kernels call them: through a C symbol, not as njit functions.

A kernel calling `matvec.matvec3` (or `lowp.matvec2_bf16`, `int8.matvec_int8`, ...) as an njit function
links a copy of its parallel loop, its dot products and their LLVM IR into the kernel's own module, which
LLVM optimizes and turns into machine code again, kernel after kernel. Instead, each (weight format,
number of matrices, row group) is compiled once per machine into a C-callable copy (`cfunc`, kept in
Numba's on-disk cache) and bound to a symbol (`symbol`) that the kernel declares by name, as the attention
library does (`attention_block.py`); the kernel's machine code then calls the library by that name. One
call per product, never per row: the same parallel loop runs inside.

Generated code calls `matvec(a, w, c, group)`, `matvec3_int8(a, q0, s0, ..., c2, group)`, ... with the
arguments of the njit functions they stand for (`group` a constant). A kernel module binds the symbols it
declares before its kernel is compiled or loaded from the cache (`bind`, a line that `codegen` writes
above the kernel): a cached kernel names a symbol that only exists once its entry was compiled or loaded.
Operands whose rows are not one after the other are copied first, outputs written through a copy then.
"""
from __future__ import annotations

import re

import llvmlite.binding as llvm
import numpy as np
from numba import carray, cfunc, njit, types  # noqa: F401 - carray, np: names of the entries' source
from numba.core import errors
from numba.extending import overload

from fusec.backends.numba_cpu.blas import _ptr
# the njit functions the entries run (the names of `_entry_source`)
from fusec.backends.numba_cpu.int8 import matvec2_int8 as _mvi2  # noqa: F401
from fusec.backends.numba_cpu.int8 import matvec3_int8 as _mvi3  # noqa: F401
from fusec.backends.numba_cpu.int8 import matvec_int8 as _mvi1  # noqa: F401
from fusec.backends.numba_cpu.matvec import matvec as _mv1, matvec2 as _mv2, matvec3 as _mv3  # noqa: F401

FORMATS = ("", "_bf16", "_int8")  # the weight formats, as generated calls name them (`gemm.WIDENED_GEMMS`)
_WEIGHT = {"": "np.float32", "_bf16": "np.uint16"}  # format -> the dtype of a weight [N, K] (int8: blocks)
_ENTRIES: dict = {}  # (format, count, group) -> (the bound cfunc, the ExternalFunction that calls it)


def symbol(fmt: str, count: int, group: int) -> str:
    return f"fusec_matvec{count}{fmt}_g{int(group)}"


def _operands(fmt: str, count: int) -> list[str]:
    """The names of a call's weight operands: w0, w1, ... or q0, s0, q1, s1, ... for int8."""
    if fmt == "_int8":
        return [f"{p}{i}" for i in range(count) for p in ("q", "s")]
    return [f"w{i}" for i in range(count)]


def _entry_source(fmt: str, count: int, group: int) -> str:
    """The C entry's source: (a, M, K, then per weight matrix its pointers and rows N, then the outputs)."""
    ops, outs = _operands(fmt, count), [f"c{i}" for i in range(count)]
    rows = [f"n{i}" for i in range(count)]
    params = ["a", "m", "k"] + ops + rows + outs
    views = ["    a = carray(a, (m, k), np.float32)"]
    for i in range(count):
        if fmt == "_int8":  # int8 blocks of 32 and their scales (`int8.py`)
            views.append(f"    q{i} = carray(q{i}, (n{i}, k // 32, 32), np.int8)")
            views.append(f"    s{i} = carray(s{i}, (n{i}, k // 32, 1), np.float32)")
        else:
            views.append(f"    w{i} = carray(w{i}, (n{i}, k), {_WEIGHT[fmt]})")
        views.append(f"    c{i} = carray(c{i}, (m, n{i}), np.float32)")
    target = f"_mvi{count}" if fmt == "_int8" else f"_mv{count}"
    return (f"def {symbol(fmt, count, group)}({', '.join(params)}):\n" + "\n".join(views) +
            f"\n    {target}(a, {', '.join(ops + outs)}, {int(group)})\n")


def _c_signature(fmt: str, count: int):
    n = len(_operands(fmt, count))
    return types.void(*([types.voidptr, types.intp, types.intp] + [types.voidptr] * n + [types.intp] * count +
                        [types.voidptr] * count))


def bind(fmt: str, count: int, group: int):
    """The entry of (format, count, group), compiled (or loaded from Numba's cache) and bound to its symbol
    once per process: what a kernel that declares the symbol needs before it is compiled or loaded."""
    key = (fmt, int(count), int(group))
    if key not in _ENTRIES:
        if fmt not in FORMATS or count not in (1, 2, 3):
            raise ValueError(f"matrix-vector entry: format one of {FORMATS} and 1-3 matrices expected, "
                             f"got {fmt!r}, {count}")
        scope = dict(globals())
        code = compile(_entry_source(*key), __file__, "exec")  # this file: Numba's cache locates it here
        exec(code, scope)
        entry = cfunc(_c_signature(fmt, count), cache=True)(scope[symbol(*key)])
        llvm.add_symbol(symbol(*key), entry.address)
        _ENTRIES[key] = (entry, types.ExternalFunction(symbol(*key), _c_signature(fmt, count)))
    return _ENTRIES[key][1]


@njit(inline="always")
def _rows(x):
    """x with its rows one after the other (a copy only when they are not)."""
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


@njit(inline="always")
def _copy(src, dst):
    """dst[:] = src for 2-d arrays (a loop: Numba's slice assignment costs seconds to compile)."""
    for i in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[i, j] = src[i, j]


def _call(fmt: str, count: int, contiguous: set[str]) -> str:
    """The njit implementation of a generated call `matvec{count}{fmt}(a, <weights>, <outputs>, group)`;
    `contiguous`: the arguments C-contiguous by their types (what generated kernels pass), read as they are
    (the others through copies: code only where it may run, which every kernel would compile)."""
    ops, outs = _operands(fmt, count), [f"c{i}" for i in range(count)]
    name = f"matvec{count if count > 1 else ''}{fmt}"
    weights = ops[::2] if fmt == "_int8" else ops
    lines = [f"def call(a, {', '.join(ops + outs)}, group):"]
    lines += [f"    {x} = _rows({x})" for x in ["a"] + ops if x not in contiguous]
    lines += [f"    {c}w = {c}" if c in contiguous else f"    {c}w = _rows({c})" for c in outs]
    for w, c in zip(weights, outs):
        size = f"{w}.shape[1] * {w}.shape[2]" if fmt == "_int8" else f"{w}.shape[1]"
        lines.append(f"    if {size} != a.shape[1] or {c}.shape[0] != a.shape[0] or {c}.shape[1] != {w}.shape[0]:")
        lines.append(f"        raise ValueError('{name}: weights [N, K] and outputs [M, N] expected "
                     "for activations [M, K]')")
    args = (["_ptr(a)", "a.shape[0]", "a.shape[1]"] + [f"_ptr({o})" for o in ops] +
            [f"{w}.shape[0]" for w in weights] + [f"_ptr({c}w)" for c in outs])
    lines.append(f"    fn({', '.join(args)})")
    lines += [f"    if not {c}.flags.c_contiguous:\n        _copy({c}w, {c})" for c in outs if c not in contiguous]
    # read after the call: the copies live until it returns
    lines.append(f"    return a.shape[0] + {' + '.join(f'{o}.shape[0]' for o in ops + [c + 'w' for c in outs])}")
    return "\n".join(lines) + "\n"


def _overload(fmt: str, count: int):
    """The function generated code calls as `matvec{count}{fmt}` (njit code only), typed by `_call`."""
    name = f"matvec{count if count > 1 else ''}{fmt}"
    params = ", ".join(["a"] + _operands(fmt, count) + [f"c{i}" for i in range(count)] + ["group"])
    scope: dict = {}
    exec(f"def {name}({params}):\n    raise NotImplementedError('{name} runs inside njit code only')\n"
         f"def typer({params}):\n    return implement(({params},))\n", scope)

    def implement(args):
        group = args[-1]
        if not isinstance(group, types.IntegerLiteral):
            raise errors.TypingError(f"{name}: the row group must be a constant, got {group}")
        impl = {"_rows": _rows, "_copy": _copy, "_ptr": _ptr, "np": np, "fn": bind(fmt, count, group.literal_value)}
        names = ["a"] + _operands(fmt, count) + [f"c{i}" for i in range(count)]
        exec(_call(fmt, count, {x for x, t in zip(names, args) if getattr(t, "layout", "") == "C"}), impl)
        return impl["call"]
    scope["implement"] = implement
    overload(scope[name], prefer_literal=True)(scope["typer"])
    return scope[name]


matvec, matvec2, matvec3 = (_overload("", n) for n in (1, 2, 3))
matvec_bf16, matvec2_bf16, matvec3_bf16 = (_overload("_bf16", n) for n in (1, 2, 3))
matvec_int8, matvec2_int8, matvec3_int8 = (_overload("_int8", n) for n in (1, 2, 3))


# a call on one line, its last argument the group (arguments may hold parentheses: `a0.reshape((1, -1))`)
_CALL = re.compile(r"\bmatvec([23]?)(_bf16|_int8)?\(.*, (\d+)\)$", re.MULTILINE)
_ANY_CALL = re.compile(r"\bmatvec[23]?(?:_bf16|_int8)?\(")  # every call, however written


def binding_lines(source: str) -> str:
    """The lines that bind, above a generated kernel, the entries its matrix-vector calls declare (`bind`;
    the calls are those `gemm.py` writes: `matvec2_int8(..., 16)`)."""
    found = _CALL.findall(source)
    if len(found) != len(_ANY_CALL.findall(source)):  # an unbound symbol would crash a cached kernel's load
        raise AssertionError("matvec_call: a generated matrix-vector call is not written as one line ending "
                             f"in its constant row group:\n{source}")
    keys = dict.fromkeys((fmt or "", int(n or 1), int(group)) for n, fmt, group in found)
    return "".join(f"bind_matvec({fmt!r}, {n}, {group})\n" for fmt, n, group in keys)
