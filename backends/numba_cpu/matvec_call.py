"""The matrix-vector products as generated kernels call them: through a C symbol, not as njit functions.

A kernel calling `matvec.matvec3` (or `lowp.matvec2_bf16`, `int8.matvec_int8`, ...) as an njit function
links a copy of its parallel loop, its dot products and their LLVM IR into the kernel's own module, which
LLVM optimizes and turns into machine code again, kernel after kernel. Instead, each (weight format,
number of matrices, row group) is a library entry (`entries.py`): compiled once per machine into a
C-callable copy and bound to a symbol (`symbol`) that the kernel declares by name. One call per product,
never per row: the same parallel loop runs inside.

Generated code calls `matvec(a, w, c, group)`, `matvec3_int8(a, q0, s0, ..., c2, group)`, ... with the
arguments of the njit functions they stand for (`group` a constant); the emitter records the entry of each
call (`key`, family "matvec") so that the kernel's module binds it before the kernel compiles or loads.
Operands whose rows are not one after the other are copied first, outputs written through a copy then.
"""
from __future__ import annotations

from numba import types
from numba.core import errors

from fusec.backends.numba_cpu.entries import Array, Entry, caller, register
# the njit functions the entries run (the names of their bodies)
from fusec.backends.numba_cpu.int8 import matvec2_int8 as _mvi2  # noqa: F401
from fusec.backends.numba_cpu.int8 import matvec3_int8 as _mvi3  # noqa: F401
from fusec.backends.numba_cpu.int8 import matvec_int8 as _mvi1  # noqa: F401
from fusec.backends.numba_cpu.matvec import matvec as _mv1, matvec2 as _mv2, matvec3 as _mv3  # noqa: F401

FORMATS = ("", "_bf16", "_int8")  # the weight formats, as generated calls name them (`gemm.WIDENED_GEMMS`)
FAMILY = "matvec"


def symbol(fmt: str, count: int, group: int) -> str:
    return f"fusec_matvec{count}{fmt}_g{int(group)}"


def name(fmt: str, count: int) -> str:
    """The name generated code calls: matvec, matvec2_bf16, matvec3_int8, ..."""
    return f"matvec{count if count > 1 else ''}{fmt}"


def _weights(fmt: str, count: int) -> list[Array]:
    """A call's weight operands: w0, w1, ... or q0, s0, q1, s1, ... for int8 (blocks of 32 and their scales)."""
    if fmt == "_int8":
        return [x for i in range(count) for x in (Array(f"q{i}", "int8", 3), Array(f"s{i}", "float32", 3))]
    return [Array(f"w{i}", "uint16" if fmt == "_bf16" else "float32") for i in range(count)]


def entry(fmt: str, count: int, group: int) -> Entry:
    """The entry of (format, count, group): a(M, K), the weights [N, K], the outputs c [M, N]."""
    if fmt not in FORMATS or count not in (1, 2, 3):
        raise ValueError(f"matrix-vector entry: format one of {FORMATS} and 1-3 matrices expected, "
                         f"got {fmt!r}, {count}")
    weights, outs = _weights(fmt, count), [Array(f"c{i}", output=True) for i in range(count)]
    target = f"_mvi{count}" if fmt == "_int8" else f"_mv{count}"
    checks = []
    for w, c in zip(weights[::2] if fmt == "_int8" else weights, outs):
        size = f"{w.name}.shape[1] * {w.name}.shape[2]" if fmt == "_int8" else f"{w.name}.shape[1]"
        bad = f"{size} != a.shape[1] or {c.name}.shape[0] != a.shape[0] or {c.name}.shape[1] != {w.name}.shape[0]"
        if fmt == "_int8":
            s = f"s{w.name[1:]}"
            bad += f" or {s}.shape[0] != {w.name}.shape[0] or {s}.shape[1] != {w.name}.shape[1]"
        checks.append((bad, f"{name(fmt, count)}: weights [N, K] and outputs [M, N] expected for activations [M, K]"))
    args = ", ".join(x.name for x in weights + outs)
    return Entry(symbol(fmt, count, group), __name__, (Array("a"), *weights, *outs),
                 f"{target}(a, {args}, {int(group)})", checks=tuple(checks))


def key(fmt: str, count: int, group: int) -> tuple:
    """What the emitter records for a call (`entries.binding_lines`)."""
    return (name(fmt, count), FAMILY, (fmt, int(count), int(group)))


register(FAMILY, entry)


def _caller(fmt: str, count: int):
    params = ["a"] + [x.name for x in _weights(fmt, count)] + [f"c{i}" for i in range(count)] + ["group"]

    def key_of(args: dict) -> tuple:
        if not isinstance(args["group"], types.IntegerLiteral):
            raise errors.TypingError(f"{name(fmt, count)}: the row group must be a constant, got {args['group']}")
        return fmt, count, args["group"].literal_value
    return caller(name(fmt, count), params, FAMILY, key_of)


matvec, matvec2, matvec3 = (_caller("", n) for n in (1, 2, 3))
matvec_bf16, matvec2_bf16, matvec3_bf16 = (_caller("_bf16", n) for n in (1, 2, 3))
matvec_int8, matvec2_int8, matvec3_int8 = (_caller("_int8", n) for n in (1, 2, 3))
