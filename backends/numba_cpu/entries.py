"""Library code that generated kernels call through a C symbol: one mechanism for every such entry.

A kernel calling a library function as an njit function links a copy of it (its parallel loop, its dot
products or BLAS calls, their LLVM IR) into the kernel's own module, which LLVM optimizes and turns into
machine code again, kernel after kernel. An entry instead is compiled once per machine into a C-callable
copy (`cfunc`, kept in Numba's on-disk cache beside the module that defines it) and bound to a symbol that
the kernel declares by name (`types.ExternalFunction`): the kernel's machine code calls the library by that
name. One call per product or row block, as before: the parallel loop runs inside the entry.

An `Entry` says what one entry takes: its arrays (passed C-contiguous, as a pointer and their shape), its
integer arguments, and the njit call it runs on them. `caller` makes the function generated code calls in
its place, with the arguments of the njit function it stands for: it copies operands whose rows are not one
after the other (only where their types do not say they are) and calls the symbol; the entry checks the
shapes it names and returns 1 without running when they do not fit (the caller raises). A kernel module binds the entries it calls before its kernel compiles or loads from the cache
(`binding_line`, written above the kernel by `codegen` from the entries the emitter recorded): a cached
kernel names a symbol that only exists once its entry is bound.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable

import llvmlite.binding as llvm
import numpy as np
from numba import carray, cfunc, njit, types
from numba.core import errors
from numba.extending import overload

from fusec.backends.numba_cpu.blas import _ptr


@dataclass(frozen=True)
class Array:
    name: str
    dtype: str = "float32"  # NumPy's name of its element type
    ndim: int = 2
    output: bool = False


@dataclass(frozen=True)
class Entry:
    symbol: str  # the C symbol (and the name of the entry's function)
    home: str  # the module whose names `body` uses; Numba caches the entry beside its file
    arrays: tuple[Array, ...]
    body: str  # the call the entry runs, over the arrays and `ints` by name
    ints: tuple[str, ...] = ()  # integer arguments passed at run time (a flag)
    checks: tuple[tuple[str, str], ...] = ()  # (condition of a bad call, message) over the arrays and ints


FAMILIES: dict[str, Callable[..., Entry]] = {}  # family -> its entry of a key (`register`)
CALLERS: dict[str, str] = {}  # the name generated code calls -> its family
_BOUND: dict[str, object] = {}  # symbol -> the ExternalFunction that calls it (its cfunc kept alive in _CFUNCS)
_CFUNCS: dict[str, object] = {}


def register(family: str, entry_of: Callable[..., Entry]) -> None:
    """Make `entry_of(*key)` the entry `bind_entry(family, *key)` binds (a module defining entries does this
    at import; generated modules import it before their binding lines run)."""
    FAMILIES[family] = entry_of


def _c_params(entry: Entry) -> list[str]:
    dims = [f"{a.name}_{d}" for a in entry.arrays for d in range(a.ndim)]
    return [a.name for a in entry.arrays] + dims + list(entry.ints)


def _signature(entry: Entry):
    n = len(entry.arrays)
    return types.intp(*([types.voidptr] * n + [types.intp] * (len(_c_params(entry)) - n)))


def _entry_source(entry: Entry, name: str) -> str:
    views = [f"    {a.name} = carray({a.name}, ({', '.join(f'{a.name}_{d}' for d in range(a.ndim))},), np.{a.dtype})"
             for a in entry.arrays]
    # the shapes checked here, compiled once, not in every kernel's caller (a branch and a raise each: measured,
    # the symbolic tinyllama_1b block's kernels compiled in 0.84x the time without them); 1: a bad call
    checks = [f"    if {cond}:\n        return 1" for cond, _ in entry.checks]
    return (f"def {name}({', '.join(_c_params(entry))}):\n" + "\n".join(views + checks) +
            f"\n    {entry.body}\n    return 0\n")


def bind(entry: Entry):
    """The ExternalFunction that calls `entry`, compiled (or loaded from Numba's cache) and bound to its
    symbol once per process: what a kernel that declares the symbol needs before it compiles or loads."""
    if entry.symbol not in _BOUND:
        home = importlib.import_module(entry.home)
        scope = {**vars(home), "carray": carray, "np": np}
        name = entry.symbol  # cached under the library's digest (`library_cache`): a changed library compiles it again
        exec(compile(_entry_source(entry, name), home.__file__, "exec"), scope)  # Numba's cache locates it there
        compiled = cfunc(_signature(entry), cache=True)(scope[name])
        llvm.add_symbol(entry.symbol, compiled.address)
        _CFUNCS[entry.symbol] = compiled
        _BOUND[entry.symbol] = types.ExternalFunction(entry.symbol, _signature(entry))
    return _BOUND[entry.symbol]


def bind_entry(family: str, *key) -> None:
    """What a binding line runs (`binding_line`)."""
    if family not in FAMILIES:
        raise ValueError(f"library entries: a family of {sorted(FAMILIES)} expected, got {family!r}")
    bind(FAMILIES[family](*key))


def binding_line(family: str, key: tuple) -> str:
    return f"bind_entry({', '.join(repr(x) for x in (family,) + tuple(key))})\n"


def binding_lines(entries, source: str) -> str:
    """The lines that bind, above generated `source`, the `entries` [(caller name, family, key)] its calls
    declare. A call of an entry's caller that is not among them is a bug of the emitter (the kernel, loaded
    from the cache without the symbol bound, would crash): refused here."""
    called = set(re.findall(r"\b(" + "|".join(map(re.escape, CALLERS)) + r")\(", source)) if CALLERS else set()
    missing = called - {name for name, _, _ in entries}
    if missing:
        raise AssertionError(f"library entries: generated calls of {sorted(missing)} recorded no entry to bind:\n"
                             f"{source}")
    return "".join(dict.fromkeys(binding_line(family, key) for _, family, key in entries))


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


def _caller_source(entry: Entry, params: list[str], contiguous: set[str]) -> str:
    """The njit code of a call `name(*params)` of `entry`; `contiguous`: the arrays C-contiguous by their
    types (what generated kernels pass), read as they are (the others through copies: code only where it
    may run, which every kernel would compile)."""
    lines = [f"def call({', '.join(params)}):"]
    views = {}
    for a in entry.arrays:
        views[a.name] = f"{a.name}_c" if a.output else a.name
        if a.name not in contiguous or a.output:
            lines.append(f"    {views[a.name]} = {a.name if a.name in contiguous else f'_rows({a.name})'}")
    args = ([f"_ptr({views[a.name]})" for a in entry.arrays] +
            [f"{a.name}.shape[{d}]" for a in entry.arrays for d in range(a.ndim)] +
            [f"(1 if {i} else 0)" for i in entry.ints])
    message = "; ".join(dict.fromkeys(m for _, m in entry.checks)) or f"{entry.symbol}: bad call"
    lines.append(f"    if fn({', '.join(args)}) != 0:\n        raise ValueError({message!r})")
    lines += [f"    if not {a.name}.flags.c_contiguous:\n        _copy({views[a.name]}, {a.name})"
              for a in entry.arrays if a.output and a.name not in contiguous]
    # read after the call: the copies live until it returns
    lines.append(f"    return {' + '.join(f'{v}.shape[0]' for v in views.values())}")
    return "\n".join(lines) + "\n"


def _check_types(name: str, entry: Entry, args: dict) -> None:
    for a in entry.arrays:
        t = args[a.name]
        if not isinstance(t, types.Array) or t.ndim != a.ndim or str(t.dtype) != a.dtype:
            raise errors.TypingError(f"{name}: {a.name} must be a {a.ndim}-d {a.dtype} array, got {t}")


def caller(name: str, params: list[str], family: str, key_of: Callable[[dict], tuple]):
    """The function generated code calls as `name(*params)` (njit code only) in place of an njit function of
    those arguments: it calls the entry `FAMILIES[family](*key_of(argument types by name))`."""
    scope: dict = {}
    args = ", ".join(params)
    exec(f"def {name}({args}):\n    raise NotImplementedError('{name} runs inside njit code only')\n"
         f"def typer({args}):\n    return implement(({args},))\n", scope)

    def implement(arg_types):
        by_name = dict(zip(params, arg_types))
        entry = FAMILIES[family](*key_of(by_name))
        _check_types(name, entry, by_name)
        impl = {"_rows": _rows, "_copy": _copy, "_ptr": _ptr, "np": np, "fn": bind(entry)}
        contiguous = {n for n, t in by_name.items() if getattr(t, "layout", "") == "C"}
        exec(_caller_source(entry, params, contiguous), impl)
        return impl["call"]
    scope["implement"] = implement
    overload(scope[name], prefer_literal=True)(scope["typer"])
    CALLERS[name] = family
    return scope[name]
