"""Scalar code for a kernel body: the value of any body node at a symbolic index, as Numba source.

`Emitter.value(node, idx)` writes the statements that compute one element of `node` at index `idx`
(a tuple of index expressions, one per axis) and returns the variable or literal holding it. Views are
index arithmetic: `permute` reorders the index, `expand` pins broadcast axes to 0, `slice` scales and
shifts, `reshape` re-linearizes, `concat` branches; nothing is copied. Reductions become loops over the
reduced axes at the point of first use, and every value is memoized per index, so a caller that asks for
a row's reductions before looping over the row computes each of them once.

Each value is written at the outermost loop level where everything it reads is defined (loop-invariant
code motion): the loop variables and temporaries named in its index (a `take` indexes by a loaded value,
e.g. `w0[t4, j1]` with `t4 = a1[0, r2]` loaded inside the loop over r2), and the variables that the
overrides it depends on read (an attention score `s` computed inside the key loop).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable

import numpy as np

from fusec.backends.numba_cpu.index import _broadcast, _insert_axes, iadd, imul, reshape_index  # noqa: F401
from fusec.backends.numba_cpu.writer import Writer
from fusec.dtypes import round_bf16
from fusec.guards import index_source, take_bound
from fusec.ir import Graph
from fusec.machines import cpu
from fusec.passes.tile import loop_tiles

NP = {"f32": "np.float32", "f64": "np.float64", "f16": "np.float16", "i64": "np.int64", "i32": "np.int32",
      "i16": "np.int16", "i8": "np.int8", "u8": "np.uint8", "bool": "np.bool_"}
UNARY = {"neg": "(-{0})", "exp": "np.exp({0})", "log": "np.log({0})", "sqrt": "np.sqrt({0})",
         "sin": "np.sin({0})", "cos": "np.cos({0})", "tanh": "np.tanh({0})", "abs": "abs({0})",
         "floor": "np.floor({0})", "not": "(not {0})",
         "rsqrt": "({one} / np.sqrt({0}))", "reciprocal": "({one} / {0})",
         "sigmoid": "({one} / ({one} + np.exp(-{0})))", "relu": "max({0}, {zero})",
         "erf": "{T}(math.erf({0}))"}
BINARY = {"add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "div": "({0} / {1})",
          # max/min propagate NaN from either side, like torch.maximum/minimum (Python's max would not)
          "pow": "({0} ** {1})", "max": "({0} if {0} >= {1} or {0} != {0} else {1})",
          "min": "({0} if {0} <= {1} or {0} != {0} else {1})", "and": "({0} & {1})",
          "or": "({0} | {1})", "eq": "({0} == {1})", "ne": "({0} != {1})", "lt": "({0} < {1})",
          "le": "({0} <= {1})", "gt": "({0} > {1})", "ge": "({0} >= {1})"}

# ops whose bf16 result is computed in float32 and must be rounded to bf16
ROUNDED = frozenset(UNARY) | frozenset(BINARY) | {"cast", "iota", "sum", "matmul"}
NARROW_INTS = ("i32", "i16", "i8", "u8")


def literal(value, dtype: str) -> str:
    """A typed literal, so float32 code never promotes to float64."""
    if dtype == "bool":
        return "True" if value else "False"
    if dtype in ("f32", "f64", "f16", "bf16"):
        if dtype == "bf16":  # the constant as a bf16 node holds it (the reference backend rounds it too)
            value = float(round_bf16(np.array([value], np.float32))[0])
        text = {float("inf"): "np.inf", float("-inf"): "-np.inf"}.get(float(value))
        if text is None:
            text = "np.nan" if value != value else repr(float(value))
        return f"{NP['f32' if dtype == 'bf16' else dtype]}({text})"
    return f"{NP[dtype]}({int(value)})"


# a variable name in generated code: not an attribute (np.exp) nor the exponent of a literal (1e-05)
_NAME = re.compile(r"(?<![\w.])[A-Za-z_][A-Za-z_0-9]*")


def _names(text: str) -> set[str]:
    return set(_NAME.findall(text))


class Emitter:
    """Renders body nodes as scalar statements into `w`. `arrays` maps body node ids to array variables
    (kernel operands, params, stored constants); `overrides` maps node ids to a function of the index
    giving an expression (a matmul's accumulator tile, a score-row buffer). `tiles` are the kernel's
    tiles and loop thresholds (`passes.tile`); those it lacks are the tiling pass's for this cpu."""

    def __init__(self, body: Graph, w: Writer, arrays: dict[int, str],
                 overrides: dict[int, Callable[[tuple[str, ...]], str]] | None = None,
                 tiles: dict[str, int] | None = None):
        self.g, self.w, self.arrays = body, w, arrays
        self.tiles = {**loop_tiles(cpu()), **(tiles or {})}
        self.overrides = overrides or {}
        self.memo: dict[tuple[int, tuple[str, ...]], tuple[str, int]] = {}
        self.count = 0
        self._under: dict[tuple[int, frozenset], frozenset] = {}  # overrides a node's value depends on
        # takes whose indices are computed in the kernel (not checked before it): the code checks them
        self.gathers = [i for i, n in enumerate(body.nodes) if n.op == "take" and index_source(body, n) is None]
        # (caller name, family, key) of each library entry the code calls (`entries.py`): bound above the kernel
        self.entries: list[tuple[str, str, tuple]] = []

    def tmp(self, prefix: str = "t") -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    @contextmanager
    def loop(self, header: str, binds: tuple[str, ...] = (), barrier: bool = False):
        """A block of generated code; values computed inside it are forgotten when it closes."""
        with self.w.block(header, binds, barrier):
            yield
        depth = self.w.depth
        self.memo = {k: v for k, v in self.memo.items() if v[1] <= depth}

    def value(self, nid: int, idx: tuple[str, ...]) -> str:
        """The variable (or literal) holding node `nid` at index `idx`, computing it if needed."""
        n = self.g.nodes[nid]
        idx = tuple("0" if d == 1 else i for d, i in zip(n.shape, idx))
        key = (nid, idx)
        if key in self.memo:
            return self.memo[key][0]
        # no shallower than the deepest definition of anything the value reads: the loop variables and
        # temporaries of its index, and what the overrides below it read (their index aside)
        level = max(self.w.level_of(_names(" ".join(idx))), self._override_level(nid))
        with self.w.at(level):
            level = self.w.depth  # (never above the floor)
            expr = self._render(nid, idx)
            deepest = self.w.level_of(_names(expr))
            if deepest > level:  # an operand was placed deeper than its index said: a bug of this module
                raise AssertionError(f"numba codegen: {expr} needs level {deepest}, placed at {level}")
            if not _is_atom(expr):
                var = self.tmp()
                self.w.line(f"{var} = {expr}")
                self.w.define(var)
                expr = var
        self.memo[key] = (expr, level)
        return expr

    def _override_level(self, nid: int) -> int:
        """The deepest level at which a variable read by an override that `nid`'s value depends on is
        defined (an override's expression may read a variable its index does not name, e.g. `s`)."""
        if not self.overrides:
            return 0
        names: set[str] = set()
        for o in self._overrides_under(nid):
            rank = len(self.g.nodes[o].shape)
            names |= _names(self.overrides[o](("0",) * rank))
        return self.w.level_of(names)

    def _overrides_under(self, nid: int) -> frozenset:
        """The overridden nodes among `nid` and its operands, transitively (not through an override)."""
        key = (nid, frozenset(self.overrides))
        if key not in self._under:
            found, seen, todo = set(), set(), [nid]
            while todo:
                n = todo.pop()
                if n in seen:
                    continue
                seen.add(n)
                if n in self.overrides:
                    found.add(n)
                elif n not in self.arrays:
                    todo.extend(self.g.nodes[n].args)
            self._under[key] = frozenset(found)
        return self._under[key]

    def operand(self, nid: int, arg: int, idx: tuple[str, ...]) -> str:
        """Value of operand `arg` of node `nid` at `idx`, broadcasting it to `nid`'s shape."""
        a = self.g.nodes[arg]
        rank = len(a.shape)
        sub = idx[len(idx) - rank:] if rank else ()
        return self.value(arg, tuple("0" if d == 1 else i for d, i in zip(a.shape, sub)))

    def _render(self, nid: int, idx: tuple[str, ...]) -> str:
        n = self.g.nodes[nid]
        if nid in self.overrides:
            return _narrowed(n.op, n.dtype, self.overrides[nid](idx))
        if nid in self.arrays:
            load = f"{self.arrays[nid]}[{', '.join(idx)}]" if idx else f"{self.arrays[nid]}[()]"
            return f"load_bf16({load})" if n.dtype == "bf16" else load  # bits (weights) or float32
        return _narrowed(n.op, n.dtype, self._compute(nid, idx))

    def _compute(self, nid: int, idx: tuple[str, ...]) -> str:
        n = self.g.nodes[nid]
        op, dt = n.op, n.dtype
        T = NP.get(dt, "np.float32")
        one, zero = (literal(1, dt), literal(0, dt)) if dt != "bool" else ("1", "0")
        if op == "const":
            return literal(n.attr("value"), dt)
        if op == "iota":
            e = iadd(imul(idx[n.attr("axis")], n.attr("step", 1)), str(n.attr("start", 0)))
            return f"{T}({e})"
        if op in UNARY:
            text = UNARY[op]
            if dt in ("f32", "bf16"):  # float32 math: the exp that vectorizes (`fastexp.py`)
                text = text.replace("np.exp(", "exp32(")
            return text.format(self.operand(nid, n.args[0], idx), one=one, zero=zero, T=T)
        if op in BINARY:
            a, b = (self.operand(nid, x, idx) for x in n.args)
            exponent = self.g.nodes[n.args[1]]
            if op == "pow" and exponent.op == "const" and exponent.attr("value") == 2:
                return f"({a} * {a})"
            if op == "pow" and exponent.op == "const" and exponent.attr("value") == 0.5:
                return f"np.sqrt({a})"  # as torch does: pow(-inf, 0.5) is nan, not C pow's inf
            return BINARY[op].format(a, b)
        if op == "where":
            c, a, b = (self.operand(nid, x, idx) for x in n.args)
            return f"({a} if {c} else {b})"
        if op == "cast":
            src = self.operand(nid, n.args[0], idx)
            return f"({src} != 0)" if dt == "bool" else f"{T}({src})"
        if op in ("sum", "amax", "amin", "argmax", "matmul"):
            return self._reduce(nid, idx)
        return self._view(nid, idx)

    def _view(self, nid: int, idx: tuple[str, ...]) -> str:
        n = self.g.nodes[nid]
        src = self.g.nodes[n.args[0]] if n.args else None
        if n.op == "reshape":
            return self.value(n.args[0], tuple(reshape_index(idx, n.shape, src.shape)))
        if n.op == "permute":
            inner = ["0"] * len(idx)
            for out_axis, in_axis in enumerate(n.attr("perm")):
                inner[in_axis] = idx[out_axis]
            return self.value(n.args[0], tuple(inner))
        if n.op == "expand":
            return self.value(n.args[0], tuple("0" if s == 1 else i for s, i in zip(src.shape, idx)))
        if n.op == "slice":
            ax, start, step = n.attr("axis"), n.attr("start"), n.attr("step")
            inner = list(idx)
            inner[ax] = iadd(imul(idx[ax], step), str(start))
            return self.value(n.args[0], tuple(inner))
        if n.op == "concat":
            return self._concat(nid, idx)
        if n.op == "take":
            ax = n.attr("axis")
            rank = len(self.g.nodes[n.args[1]].shape)
            j = self.value(n.args[1], idx[ax:ax + rank])
            if nid in self.gathers:  # indices computed in this kernel: checked here (`fusec.guards`)
                j = self._checked(j, nid)
            return self.value(n.args[0], idx[:ax] + (j,) + idx[ax + rank:])
        raise NotImplementedError(f"numba codegen has no rule for {n.op}")

    def _checked(self, j: str, nid: int) -> str:
        """Index `j` of take `nid` checked against its bound where `j` is defined (`checked_index`)."""
        key = ("checked", j, nid)
        if key in self.memo:
            return self.memo[key][0]
        with self.w.at(self.w.level_of(_names(j))):
            var, level = self.tmp("ix"), self.w.depth
            self.w.line(f"{var} = checked_index({j}, {take_bound(self.g, self.g.nodes[nid])}, kerr, "
                        f"{self.gathers.index(nid)})")
            self.w.define(var)
        self.memo[key] = (var, level)
        return var

    def _concat(self, nid: int, idx: tuple[str, ...]) -> str:
        """Branch on the concat axis; each branch reads its own operand (no copy, no out-of-range read)."""
        n = self.g.nodes[nid]
        ax = n.attr("axis")
        var = self.tmp("cat")
        self.w.define(var)
        start = 0
        for k, arg in enumerate(n.args):
            size = self.g.nodes[arg].shape[ax]
            inner = list(idx)
            inner[ax] = f"{idx[ax]} - {start}" if start else idx[ax]
            last = k == len(n.args) - 1
            header = "else" if last else ("if" if k == 0 else "elif") + f" {idx[ax]} < {start + size}"
            with self.loop(header, barrier=True):
                self.w.line(f"{var} = {self.value(arg, tuple(inner))}")
            start += size
        return var

    def _reduce(self, nid: int, idx: tuple[str, ...]) -> str:
        """A loop over the reduced axes (a matmul reduces its K axis) written where the result is valid."""
        n = self.g.nodes[nid]
        if n.op == "matmul":
            a, b = (self.g.nodes[x] for x in n.args)
            k_var = self.tmp("r")
            ai = _broadcast(idx[:-2], a.shape[:-2]) + (idx[-2], k_var)
            bi = _broadcast(idx[:-2], b.shape[:-2]) + (k_var, idx[-1])
            loops, operand_idx, axes_vars = [(k_var, a.shape[-1])], None, None
        else:
            src = self.g.nodes[n.args[0]]
            axes = n.attr("axes")
            inner = list(idx) if n.attr("keepdim") else _insert_axes(idx, axes)
            loops = []
            for ax in axes:
                var = self.tmp("r")
                inner[ax] = var
                loops.append((var, src.shape[ax]))
            operand_idx, axes_vars = tuple(inner), [v for v, _ in loops]
        acc, dt = self.tmp("acc"), n.dtype
        sdt = self.g.nodes[n.args[0]].dtype
        best = self.tmp("best") if n.op == "argmax" else ""
        self.w.line(f"{acc} = {_init(n.op, dt, sdt)}")
        self.w.define(acc)  # (an argmax may index a take)
        if best:
            self.w.line(f"{best} = {_init('amax', sdt, sdt)}")
            self.w.define(best)
        saved, depth = dict(self.memo), self.w.depth
        blocks = [self.loop(f"for {v} in range({size})", (v,)) for v, size in loops]
        for blk in blocks:
            blk.__enter__()
        if n.op == "matmul":
            self.w.line(f"{acc} += {self.value(n.args[0], ai)} * {self.value(n.args[1], bi)}")
        else:
            v = self.value(n.args[0], operand_idx)
            if n.op == "sum":
                self.w.line(f"{acc} += {v}")
            elif n.op == "argmax":  # the first NaN wins, as in torch
                self.w.line(f"if {v} > {best} or ({v} != {v} and {best} == {best}):")
                self.w.line(f"    {best} = {v}")
                self.w.line(f"    {acc} = np.int64({axes_vars[0]})")
            elif sdt == "bool":
                self.w.line(f"{acc} = {acc} {'or' if n.op == 'amax' else 'and'} {v}")
            else:  # NaN propagates, as in torch.amax/amin
                cmp = ">" if n.op == "amax" else "<"
                self.w.line(f"{acc} = {v} if {v} {cmp} {acc} or {v} != {v} else {acc}")
        for blk in reversed(blocks):
            blk.__exit__(None, None, None)
        assert self.w.depth == depth
        self.memo = saved
        return acc


def _narrowed(op: str, dtype: str, expr: str) -> str:
    """`expr` computed in a wider type, brought back to `dtype` op by op as torch eager does: a bf16
    result is computed in float32 and rounded to bf16; Numba computes int8/16/32 and uint8 arithmetic in
    int64, so the result wraps around to its own width (x * 2 > 0 for int8 x = 100 is False in eager)."""
    if op not in ROUNDED:  # views, `where`, amax/amin only pass values of their dtype on
        return expr
    if dtype == "bf16":
        return f"rbf16({expr})"
    return f"{NP[dtype]}({expr})" if dtype in NARROW_INTS else expr


def _init(op: str, dt: str, sdt: str) -> str:
    if op in ("sum", "matmul"):
        return literal(0, dt)
    if op == "argmax":
        return "np.int64(0)"
    if sdt == "bool":
        return "False" if op == "amax" else "True"
    if sdt.startswith("f") or sdt == "bf16":
        return literal(float("-inf") if op == "amax" else float("inf"), sdt)
    return f"{NP[sdt]}({'-' if op == 'amax' else ''}(2**62))" if sdt == "i64" else f"{NP[sdt]}({'-' if op == 'amax' else ''}(2**30))"


def _is_atom(expr: str) -> bool:
    """A variable or a typed literal: no need for a temporary."""
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*|np\.\w+\(-?[\w.+-]+\)|True|False|-?\d+", expr))
