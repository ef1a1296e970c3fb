"""Symbolic sizes: a dimension known only at run time, such as a sequence length.

A `Sym` is an integer polynomial in named size variables (`s0`, `s0 + 1`, `4*s0`, `s0*s1`), each variable
carrying its bounds (`lo <= s0 <= hi`, `lo >= 1`). It is plain, hashable data, so it sits in a
`TensorType.shape` or in an attribute (`slice` stop, `reshape`/`iota` shape) wherever an int could.
Arithmetic with ints and other `Sym`s gives a `Sym`, or an int when the variables cancel. A comparison is
answered only when it holds the same way for every value in the bounds; otherwise it raises IRError, so
a decision that depends on the size is never taken silently for one size (a pass that needs a number
asks `upper(d)` explicitly). A `Sym` is never taken as an int (`range(sym)`, `np.empty` raise): code
that needs the value evaluates it with `evaluate(d, sizes)` at run time.

`str(sym)` is a Python expression of the variable names, parenthesized unless it is a bare name, so
generated code and the printer can use it where a number would go.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from fusec.errors import IRError

Monomial = tuple[str, ...]   # sorted variable names, repeated for powers; () is the constant term
NAME = re.compile(r"[a-z]\w*")


@dataclass(frozen=True)
class Sym:
    terms: tuple[tuple[Monomial, int], ...]   # sorted, no zero coefficient, at least one variable
    bounds: tuple[tuple[str, int, int], ...]  # (name, lo, hi) of every variable it uses, sorted

    # -- construction -------------------------------------------------------------------------------------
    @staticmethod
    def var(name: str, lo: int, hi: int) -> "Sym":
        """The size variable `name` with `lo <= name <= hi`."""
        check_bounds(name, lo, hi)
        return Sym((((name,), 1),), ((name, int(lo), int(hi)),))

    # -- arithmetic ---------------------------------------------------------------------------------------
    def __add__(self, other):
        o = _poly(other)
        if o is None:
            return NotImplemented
        terms = dict(self.terms)
        for m, c in o[0]:
            terms[m] = terms.get(m, 0) + c
        return _make(terms, _merge(self.bounds, o[1]))

    __radd__ = __add__

    def __neg__(self):
        return _make({m: -c for m, c in self.terms}, self.bounds)

    def __sub__(self, other):
        return NotImplemented if _poly(other) is None else self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, other):
        o = _poly(other)
        if o is None:
            return NotImplemented
        terms: dict[Monomial, int] = {}
        for m1, c1 in self.terms:
            for m2, c2 in o[0]:
                m = tuple(sorted(m1 + m2))
                terms[m] = terms.get(m, 0) + c1 * c2
        return _make(terms, _merge(self.bounds, o[1]))

    __rmul__ = __mul__

    def __floordiv__(self, other):
        """Exact division by an int or a monomial (a row-major stride); IRError if it is not exact."""
        o = _poly(other)
        if o is None:
            return NotImplemented
        if len(o[0]) != 1:
            raise IRError(f"cannot divide the size {self} by {other}: only by a number or a product of sizes")
        (dm, dc), = o[0]
        terms = {}
        for m, c in self.terms:
            rest = list(m)
            for v in dm:
                if v not in rest:
                    break
                rest.remove(v)
            else:
                if c % dc == 0:
                    terms[tuple(rest)] = c // dc
                    continue
            raise IRError(f"the size {self} is not a multiple of {other}")
        return _make(terms, self.bounds)

    def __rfloordiv__(self, other):
        if isinstance(other, int) and other == 0:
            return 0
        raise IRError(f"cannot divide {other} by the size {self}")

    def __mod__(self, other):
        """0 when `other` divides this size exactly (every value in the bounds); IRError otherwise."""
        try:
            self // other
        except IRError:
            raise IRError(f"the remainder of the size {self} by {other} depends on its value") from None
        return 0

    # -- comparisons: only when true (or false) over the whole range --------------------------------------
    def _decide(self, other, op: str, true_if, false_if):
        if _poly(other) is None:
            return NotImplemented
        lo, hi = interval(self - other)
        if true_if(lo, hi):
            return True
        if false_if(lo, hi):
            return False
        raise IRError(f"whether {self} {op} {other} depends on the sizes ({_describe(self.bounds)}); "
                      "a decision that depends on a symbolic size needs its upper bound or a run-time check")

    def __lt__(self, other):
        return self._decide(other, "<", lambda lo, hi: hi < 0, lambda lo, hi: lo >= 0)

    def __le__(self, other):
        return self._decide(other, "<=", lambda lo, hi: hi <= 0, lambda lo, hi: lo > 0)

    def __gt__(self, other):
        return self._decide(other, ">", lambda lo, hi: lo > 0, lambda lo, hi: hi <= 0)

    def __ge__(self, other):
        return self._decide(other, ">=", lambda lo, hi: lo >= 0, lambda lo, hi: hi < 0)

    # -- never an int ---------------------------------------------------------------------------------------
    def __index__(self):
        raise TypeError(f"the size {self} is only known at run time (bounds {_describe(self.bounds)})")

    __int__ = __index__

    def __bool__(self):
        return True  # a size variable is at least 1

    def __str__(self) -> str:
        parts = []
        for m, c in self.terms:
            names = "*".join(m)
            if not m:
                text = str(abs(c))
            elif abs(c) == 1:
                text = names
            else:
                text = f"{abs(c)}*{names}"
            parts.append(("-" if c < 0 else "+", text))
        text = "".join(f"{s}{t}" for s, t in parts)
        text = text[1:] if text.startswith("+") else text
        return text if NAME.fullmatch(text) else f"({text})"

    __repr__ = __str__

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b[0] for b in self.bounds)


def check_bounds(name: str, lo: Any, hi: Any) -> None:
    if not NAME.fullmatch(str(name)):
        raise IRError(f"a size variable is a lower-case name such as s0, got {name!r}")
    if not (isinstance(lo, int) and isinstance(hi, int)) or not 1 <= lo <= hi:
        raise IRError(f"size variable {name}: bounds must be integers with 1 <= lo <= hi, got ({lo}, {hi})")


def is_sym(d: Any) -> bool:
    return isinstance(d, Sym)


def is_static(shape: Iterable[Any]) -> bool:
    return not any(isinstance(d, Sym) for d in shape)


def interval(d: Any) -> tuple[int, int]:
    """The least and greatest value of `d` over its bounds (exact for the forms tracing makes: sums and
    multiples of variables; a safe enclosure for others)."""
    if not isinstance(d, Sym):
        return int(d), int(d)
    b = {n: (lo, hi) for n, lo, hi in d.bounds}
    lo = hi = 0
    for m, c in d.terms:
        small = math.prod(b[v][0] for v in m)
        big = math.prod(b[v][1] for v in m)
        lo += c * (small if c > 0 else big)
        hi += c * (big if c > 0 else small)
    return lo, hi


def upper(d: Any) -> int:
    """The largest value of a size (the size itself when it is an int): what buffers are planned for and
    what size-dependent heuristics (tiles, thresholds) are chosen for."""
    return interval(d)[1]


def lower(d: Any) -> int:
    """The smallest value of a size."""
    return interval(d)[0]


def evaluate(d: Any, sizes: Mapping[str, int]) -> int:
    """The value of a size for concrete values of its variables."""
    if not isinstance(d, Sym):
        return d
    total = 0
    for m, c in d.terms:
        try:
            total += c * math.prod(sizes[v] for v in m)
        except KeyError as e:
            raise IRError(f"no value for the size variable {e.args[0]} (known: {sorted(sizes)})") from None
    return total


def substitute(value: Any, sizes: Mapping[str, int]) -> Any:
    """`value` (a size, a shape, nested tuples of them) with every size evaluated."""
    if isinstance(value, Sym):
        return evaluate(value, sizes)
    if isinstance(value, tuple):
        return tuple(substitute(v, sizes) for v in value)
    return value


def sizes_of(values: Iterable[Any]) -> dict[str, tuple[int, int]]:
    """{name: (lo, hi)} of the variables in `values` (sizes or nested tuples); IRError if one name has two
    different bounds."""
    out: dict[str, tuple[int, int]] = {}

    def visit(v):
        if isinstance(v, Sym):
            for name, lo, hi in v.bounds:
                if out.setdefault(name, (lo, hi)) != (lo, hi):
                    raise IRError(f"size variable {name} has two bounds: {out[name]} and {(lo, hi)}")
        elif isinstance(v, tuple):
            for x in v:
                visit(x)
    for v in values:
        visit(v)
    return out


def parse_size(text: str, bounds: Mapping[str, tuple[int, int]]) -> Any:
    """A size as printed (`12`, `s0`, `(s0+1)`, `(2*s0*s1-3)`) back to an int or a Sym; every variable
    must have bounds in `bounds`."""
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    body = text[1:-1] if text.startswith("(") and text.endswith(")") else text
    if not re.fullmatch(r"[-+]?[\w*]+(?:[-+][\w*]+)*", body):
        raise IRError(f"cannot parse the size {text!r}")
    total: Any = 0
    for sign, term in re.findall(r"([-+]?)([\w*]+)", body):
        value: Any = -1 if sign == "-" else 1
        for factor in term.split("*"):
            if factor.isdigit():
                value = value * int(factor)
            elif factor in bounds:
                value = value * Sym.var(factor, *bounds[factor])
            else:
                raise IRError(f"size variable {factor} in {text!r} has no bounds (declare it in the graph's "
                              f"sizes, e.g. 'sizes {{{factor}=[1,256]}}')")
        total = total + value
    return total


def _poly(x: Any):
    if isinstance(x, Sym):
        return x.terms, x.bounds
    if isinstance(x, int) and not isinstance(x, bool):
        return ((((), x),) if x else ()), ()
    return None


def _merge(a, b) -> tuple:
    merged = dict((n, (lo, hi)) for n, lo, hi in a)
    for n, lo, hi in b:
        if merged.setdefault(n, (lo, hi)) != (lo, hi):
            raise IRError(f"size variable {n} has two bounds: {merged[n]} and {(lo, hi)}")
    return tuple(sorted((n, lo, hi) for n, (lo, hi) in merged.items()))


def _make(terms: Mapping[Monomial, int], bounds) -> Any:
    kept = tuple(sorted(((m, c) for m, c in terms.items() if c), key=lambda mc: (-len(mc[0]), mc[0])))
    if all(not m for m, _ in kept):
        return kept[0][1] if kept else 0
    used = {v for m, _ in kept for v in m}
    return Sym(kept, tuple(b for b in bounds if b[0] in used))


def _describe(bounds) -> str:
    return ", ".join(f"{n} in {lo}..{hi}" for n, lo, hi in bounds)
